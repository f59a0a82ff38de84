"""One decode loop: (chunked) prefill under a policy, optional question after compression,
greedy or sampled decoding (temperature, top-k, top-p, repetition penalty, stop strings; or a
transformers ``GenerationConfig``), streaming, and a record of what was kept and what it cost.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import torch

from tokensift.cache import SelectingCache
from tokensift.devices import clock, model_device
from tokensift.engine import make_cache
from tokensift.errors import TokensiftError
from tokensift.exact_head import applies as exact_head_applies
from tokensift.exact_head import exact_greedy_head
from tokensift.policies import Policy, build_policy
from tokensift.prefill import PrefillPolicy, build_prefill


@dataclass
class GenerationResult:
    """What ``generate`` returns; ``as_dict()`` is the CLI's JSON."""

    text: list[str]
    token_ids: list[list[int]]
    prompt_tokens: int
    new_tokens: int
    kv_tokens: float
    kv_bytes: int
    kv_bytes_full: int
    prefill_seconds: float
    decode_seconds: float
    seconds: float
    tokens_per_second: float
    policy: str
    params: dict = field(default_factory=dict)
    kv_bytes_bf16: int = 0  # what the cache would hold in a bf16 run (packed codes and scales as they are)
    kv_bytes_full_bf16: int = 0  # what a full bf16 cache holds for the same tokens
    tier_bytes: int = 0  # exact rows kept in a second tier outside the resident cache (tiered)
    prefill: str = "full"  # the prefill policy (tokensift.prefill): which prompt tokens each layer computed

    def as_dict(self, single: bool = True) -> dict:
        record = asdict(self)
        if single and len(self.text) == 1:
            record["text"], record["token_ids"] = self.text[0], self.token_ids[0]
        return record


def model_context_length(model) -> int:
    """The longest sequence the model's positions allow."""
    config = model.config.get_text_config(decoder=True)
    return int(getattr(config, "max_position_embeddings", 0) or 0)


def encode(tokenizer, text_or_ids, add_special_tokens: bool = True) -> list[int]:
    """Token ids of a string (or pass ids through)."""
    if isinstance(text_or_ids, str):
        return tokenizer(text_or_ids, add_special_tokens=add_special_tokens)["input_ids"]
    return list(text_or_ids)


def left_pad(sequences: Sequence[Sequence[int]], pad_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack token lists into ``[batch, longest]`` ids and mask, padding on the left (on ``device``)."""
    longest = max(len(seq) for seq in sequences)
    ids = [[pad_id] * (longest - len(seq)) + list(seq) for seq in sequences]
    mask = [[0] * (longest - len(seq)) + [1] * len(seq) for seq in sequences]
    return torch.tensor(ids, dtype=torch.long, device=device), torch.tensor(mask, dtype=torch.long, device=device)


class Decoder:
    """Runs forwards over a cache, tracking the 2D attention mask and true positions.
    ``exact_head``: the output layer gives :mod:`tokensift.exact_head` rows (the exact greedy
    argmax from int8 weights; not full logits: greedy decoding only)."""

    def __init__(self, model, cache, exact_head: bool = False):
        self.model = model
        self.cache = cache
        self.mask = None  # [batch, seen] long
        self.exact_head = exact_head

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Feed ``ids`` (``[batch, n]``, with its padding ``mask``); return last-position logits."""
        self.mask = mask if self.mask is None else torch.cat([self.mask, mask], dim=1)
        positions = (self.mask.cumsum(dim=1) - 1).clamp(min=0)[:, -ids.shape[1]:]
        with exact_greedy_head(self.model, self.exact_head):
            out = self.model(
                input_ids=ids,
                attention_mask=self.mask,
                position_ids=positions,
                past_key_values=self.cache,
                use_cache=True,
                logits_to_keep=1,
            )
        return out.logits[:, -1].float()

    def prefill(self, ids: torch.Tensor, mask: torch.Tensor, chunk: int | None) -> torch.Tensor:
        """Feed a prompt, in chunks of ``chunk`` tokens if given (the policy acts after each)."""
        step = chunk or ids.shape[1]
        logits = None
        for start in range(0, ids.shape[1], step):
            logits = self.forward(ids[:, start:start + step], mask[:, start:start + step])
        return logits

    def prefill_pruned(self, policy: PrefillPolicy, ids: torch.Tensor) -> torch.Tensor:
        """Feed a prompt (batch of one) under a pruning prefill policy; positions go on from the
        length the cache reports (the whole prompt, or the kept tokens when they were re-indexed)."""
        logits = policy.run(self.model, self.cache, ids)
        self.mask = torch.ones((1, self.cache.get_seq_length()), dtype=torch.long, device=ids.device)
        return logits


@dataclass
class Sampling:
    """How the next token is chosen and when a sequence stops (``generate``'s settings)."""

    max_new_tokens: int = 64
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    repetition_penalty: float = 1.0  # 1 = off
    stop_strings: tuple[str, ...] = ()
    eos_token_ids: tuple[int, ...] | None = None  # None: the tokenizer's


def sampling_from_config(config, default_max_new_tokens: int = 64) -> Sampling:
    """A transformers ``GenerationConfig`` -> :class:`Sampling` (unset fields take transformers'
    defaults: greedy unless ``do_sample``, then temperature 1, top-k 50, top-p 1)."""
    if (getattr(config, "num_beams", None) or 1) > 1:
        raise TokensiftError("beam search (num_beams > 1) is not supported; use greedy or sampling")
    sample = bool(config.do_sample)
    stops = config.stop_strings or ()
    eos = config.eos_token_id
    return Sampling(
        max_new_tokens=config.max_new_tokens if config.max_new_tokens is not None else default_max_new_tokens,
        temperature=(config.temperature if config.temperature is not None else 1.0) if sample else 0.0,
        top_p=(config.top_p if config.top_p is not None else 1.0) if sample else 1.0,
        top_k=(config.top_k if config.top_k is not None else 50) if sample else 0,
        repetition_penalty=config.repetition_penalty if config.repetition_penalty is not None else 1.0,
        stop_strings=(stops,) if isinstance(stops, str) else tuple(stops),
        eos_token_ids=None if eos is None else tuple(eos if isinstance(eos, (list, tuple)) else [eos]),
    )


def penalize_repeats(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """transformers' repetition penalty: the logits of ``seen`` tokens (``[batch, vocab]`` bool)
    divided by ``penalty`` when positive, multiplied when negative."""
    if penalty == 1.0:
        return logits
    penalized = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(seen, penalized, logits)


def keep_top_k(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """Logits outside each row's ``top_k`` largest set to -inf (0 or >= vocab: unchanged)."""
    if top_k <= 0 or top_k >= logits.shape[-1]:
        return logits
    threshold = logits.topk(top_k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < threshold, float("-inf"))


def choose_next(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator,
                top_k: int = 0) -> torch.Tensor:
    """Greedy when ``temperature == 0``, else temperature + top-k + nucleus sampling."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(keep_top_k(logits / temperature, top_k), dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        outside = sorted_probs.cumsum(dim=-1) - sorted_probs > top_p
        sorted_probs = sorted_probs.masked_fill(outside, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def resolve_policy(policy: Policy | str | None, **params) -> Policy:
    if policy is None:
        return build_policy("full")
    if isinstance(policy, str):
        return build_policy(policy, **params)
    if not isinstance(policy, Policy):
        raise TokensiftError(f"policy must be a Policy, a policy name or an expression, got {type(policy).__name__}")
    return policy


def check_length(model, prompt_len: int, max_new_tokens: int) -> None:
    if max_new_tokens < 0:
        raise TokensiftError(f"max_new_tokens must be >= 0 (got {max_new_tokens})")
    limit = model_context_length(model)
    if limit and prompt_len + max_new_tokens > limit:
        raise TokensiftError(
            f"prompt of {prompt_len} tokens + {max_new_tokens} new tokens exceeds the model's context of {limit} tokens"
        )


def seen_tokens(sequences: Sequence[Sequence[int]], vocab: int, device) -> torch.Tensor:
    """``[batch, vocab]`` bool: which token ids each sequence holds (for the repetition penalty)."""
    seen = torch.zeros(len(sequences), vocab, dtype=torch.bool, device=device)
    for row, seq in enumerate(sequences):
        if seq:
            seen[row, torch.tensor(list(seq), dtype=torch.long, device=device)] = True
    return seen


def hits_stop_string(tokenizer, ids: list[int], stops: Sequence[str]) -> bool:
    """Whether the decoded ``ids`` contain one of ``stops``."""
    text = tokenizer.decode(ids, skip_special_tokens=True)
    return any(stop in text for stop in stops)


def stream_prompt(streamer, ids: list[int]) -> None:
    """Hand the prompt to a transformers streamer first, as ``model.generate`` does."""
    if streamer is not None:
        streamer.put(torch.tensor([ids], dtype=torch.long, device="cpu"))  # streamers read host tensors


@torch.inference_mode()
def generate(
    model,
    tokenizer,
    prompt,
    *,
    policy: Policy | str | None = None,
    question=None,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    repetition_penalty: float = 1.0,
    stop_strings: Sequence[str] = (),
    generation_config=None,
    streamer=None,
    seed: int = 0,
    prefill_chunk: int | None = None,
    stop_at_eos: bool = True,
    on_token: Callable[[int], None] | None = None,
    cache: SelectingCache | None = None,
    prefill: PrefillPolicy | str | None = None,
    exact_int8_head: bool = False,
) -> GenerationResult:
    """Generate from ``prompt`` (a string, ids, or a list of either for a batch) under ``policy``.

    ``question`` (same shape as ``prompt``) is appended *after* the prompt has been prefilled
    and compressed, so the selection cannot see it (the query-agnostic protocol).
    ``generation_config`` (a transformers ``GenerationConfig``), when given, replaces
    ``max_new_tokens``, ``temperature``, ``top_p``, ``top_k``, ``repetition_penalty`` and
    ``stop_strings`` (its ``eos_token_id`` too, when set). A sequence stops after the token that
    completes a stop string (the string is kept in the text, as in transformers).
    ``streamer``: a transformers ``TextStreamer``/``TextIteratorStreamer`` (batch of one).
    ``prefill``: a prefill policy (``tokensift.prefill``; default ``full``) deciding which prompt
    tokens each layer computes (batch of one, no ``prefill_chunk`` unless ``full``).
    ``exact_int8_head``: greedy tokens from an int8 copy of the output layer, exactly the fp32
    argmax (:mod:`tokensift.exact_head`); with sampling or a repetition penalty, or where int8
    kernels are unavailable, the full fp32 layer is used as without it (same output).
    """
    policy = resolve_policy(policy)
    prefill = build_prefill(prefill)
    sampling = (sampling_from_config(generation_config, max_new_tokens) if generation_config is not None else
                Sampling(max_new_tokens, temperature, top_p, top_k, repetition_penalty, tuple(stop_strings)))
    prompts = prompt if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int) else [prompt]
    contexts = [encode(tokenizer, p) for p in prompts]
    questions = None
    if question is not None:
        question = question if len(prompts) > 1 else [question]
        questions = [encode(tokenizer, q, add_special_tokens=False) for q in question]
    if streamer is not None and len(contexts) > 1:
        raise TokensiftError("a streamer takes one prompt at a time (got a batch)")
    full_prompts = [c + q for c, q in zip(contexts, questions)] if questions else contexts
    if any(not c for c in contexts):
        raise TokensiftError("the prompt is empty (every prompt needs at least one token)")
    if prefill_chunk is not None and prefill_chunk < 1:
        raise TokensiftError(f"prefill_chunk must be >= 1 (got {prefill_chunk})")
    if prefill.prunes and (len(contexts) > 1 or prefill_chunk is not None):
        raise TokensiftError(f"prefill '{prefill.name}' takes one prompt at a time, without --prefill-chunk")
    prompt_len = max(len(c) for c in contexts) + (max(len(q) for q in questions) if questions else 0)
    check_length(model, prompt_len, sampling.max_new_tokens)
    cache = cache or make_cache(model, policy)
    exact = exact_int8_head and exact_head_applies(sampling.temperature, sampling.repetition_penalty)
    decoder = Decoder(model, cache, exact_head=exact)
    device = model_device(model)
    generator = torch.Generator(device=device).manual_seed(seed)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    eos_ids = sampling.eos_token_ids
    if eos_ids is None:
        eos_ids = () if tokenizer.eos_token_id is None else (tokenizer.eos_token_id,)
    eos = torch.tensor(eos_ids if stop_at_eos else (), dtype=torch.long, device=device)
    stream_prompt(streamer, full_prompts[0])

    start = clock(device)
    if prefill.prunes:
        logits = decoder.prefill_pruned(prefill, torch.tensor(contexts, dtype=torch.long, device=device))
    else:
        logits = decoder.prefill(*left_pad(contexts, pad_id, device), prefill_chunk)
    if questions:
        logits = decoder.forward(*left_pad(questions, pad_id, device))
    prefill_seconds = clock(device) - start

    batch = len(contexts)
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    seen = seen_tokens(full_prompts, logits.shape[-1], device) if sampling.repetition_penalty != 1.0 else None
    outputs: list[list[int]] = [[] for _ in range(batch)]
    decode_start = clock(device)
    for step in range(sampling.max_new_tokens):
        if seen is not None:
            logits = penalize_repeats(logits, seen, sampling.repetition_penalty)
        next_ids = choose_next(logits, sampling.temperature, sampling.top_p, generator, sampling.top_k)
        next_ids = torch.where(finished, torch.full_like(next_ids, pad_id), next_ids)
        if seen is not None:
            seen[torch.arange(batch, device=device), next_ids] |= ~finished
        chosen, done = next_ids.tolist(), finished.tolist()
        for row in range(batch):
            if not done[row]:
                outputs[row].append(chosen[row])
        if on_token is not None and batch == 1:
            on_token(chosen[0])
        if streamer is not None:
            streamer.put(next_ids.cpu())
        finished |= torch.isin(next_ids, eos)
        if sampling.stop_strings:
            hits = [not done[row] and hits_stop_string(tokenizer, outputs[row], sampling.stop_strings) for row in range(batch)]
            finished |= torch.tensor(hits, dtype=torch.bool, device=device)
        if bool(finished.all()) or step + 1 == sampling.max_new_tokens:
            break
        logits = decoder.forward(next_ids[:, None], torch.ones(batch, 1, dtype=torch.long, device=device))
    decode_seconds = clock(device) - decode_start
    if streamer is not None:
        streamer.end()
    new_tokens = max(len(o) for o in outputs)
    return GenerationResult(
        text=[tokenizer.decode(o, skip_special_tokens=True) for o in outputs],
        token_ids=outputs,
        prompt_tokens=prompt_len,
        new_tokens=new_tokens,
        kv_tokens=cache.kv_tokens(),
        kv_bytes=cache.kv_bytes,
        kv_bytes_full=cache.kv_bytes_full,
        kv_bytes_bf16=cache.kv_bytes_bf16,
        kv_bytes_full_bf16=cache.kv_bytes_full_bf16,
        tier_bytes=cache.tier_bytes,
        prefill_seconds=prefill_seconds,
        decode_seconds=decode_seconds,
        seconds=prefill_seconds + decode_seconds,
        tokens_per_second=(new_tokens - 1) / decode_seconds if new_tokens > 1 and decode_seconds > 0 else 0.0,
        policy=policy.name,
        params=policy.params(),
        prefill=prefill.name,
    )
