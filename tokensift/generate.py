"""One decode loop: (chunked) prefill under a policy, optional question after compression,
greedy or sampled decoding, and a record of what was kept and what it cost.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import torch

from tokensift.cache import SelectingCache, make_cache
from tokensift.errors import TokensiftError
from tokensift.policies import Policy, build_policy


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


def left_pad(sequences: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack token lists into ``[batch, longest]`` ids and mask, padding on the left."""
    longest = max(len(seq) for seq in sequences)
    ids = torch.full((len(sequences), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), longest), dtype=torch.long)
    for row, seq in enumerate(sequences):
        if seq:
            ids[row, longest - len(seq):] = torch.tensor(seq, dtype=torch.long)
            mask[row, longest - len(seq):] = 1
    return ids, mask


class Decoder:
    """Runs forwards over a cache, tracking the 2D attention mask and true positions."""

    def __init__(self, model, cache):
        self.model = model
        self.cache = cache
        self.mask = None  # [batch, seen] long

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Feed ``ids`` (``[batch, n]``, with its padding ``mask``); return last-position logits."""
        self.mask = mask if self.mask is None else torch.cat([self.mask, mask], dim=1)
        positions = (self.mask.cumsum(dim=1) - 1).clamp(min=0)[:, -ids.shape[1]:]
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


def choose_next(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator) -> torch.Tensor:
    """Greedy when ``temperature == 0``, else temperature + nucleus sampling."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits / temperature, dim=-1)
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
    return policy


def check_length(model, prompt_len: int, max_new_tokens: int) -> None:
    limit = model_context_length(model)
    if limit and prompt_len + max_new_tokens > limit:
        raise TokensiftError(
            f"prompt of {prompt_len} tokens + {max_new_tokens} new tokens exceeds the model's context of {limit} tokens"
        )


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
    seed: int = 0,
    prefill_chunk: int | None = None,
    stop_at_eos: bool = True,
    on_token: Callable[[int], None] | None = None,
    cache: SelectingCache | None = None,
) -> GenerationResult:
    """Generate from ``prompt`` (a string, ids, or a list of either for a batch) under ``policy``.

    ``question`` (same shape as ``prompt``) is appended *after* the prompt has been prefilled
    and compressed, so the selection cannot see it (the query-agnostic protocol).
    """
    policy = resolve_policy(policy)
    prompts = prompt if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int) else [prompt]
    contexts = [encode(tokenizer, p) for p in prompts]
    questions = None
    if question is not None:
        question = question if len(prompts) > 1 else [question]
        questions = [encode(tokenizer, q, add_special_tokens=False) for q in question]
    prompt_len = max(len(c) for c in contexts) + (max(len(q) for q in questions) if questions else 0)
    check_length(model, prompt_len, max_new_tokens)
    cache = cache or make_cache(model, policy)
    decoder = Decoder(model, cache)
    generator = torch.Generator().manual_seed(seed)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    start = time.perf_counter()
    logits = decoder.prefill(*left_pad(contexts, pad_id), prefill_chunk)
    if questions:
        logits = decoder.forward(*left_pad(questions, pad_id))
    prefill_seconds = time.perf_counter() - start

    batch = len(contexts)
    finished = torch.zeros(batch, dtype=torch.bool)
    outputs: list[list[int]] = [[] for _ in range(batch)]
    decode_start = time.perf_counter()
    for step in range(max_new_tokens):
        if step > 0:
            logits = decoder.forward(next_ids[:, None], torch.ones(batch, 1, dtype=torch.long))
        next_ids = choose_next(logits, temperature, top_p, generator)
        next_ids = torch.where(finished, torch.full_like(next_ids, pad_id), next_ids)
        for row in range(batch):
            if not finished[row]:
                outputs[row].append(int(next_ids[row]))
        if on_token is not None and batch == 1:
            on_token(int(next_ids[0]))
        if stop_at_eos and tokenizer.eos_token_id is not None:
            finished |= next_ids == tokenizer.eos_token_id
            if bool(finished.all()):
                break
    decode_seconds = time.perf_counter() - decode_start
    new_tokens = max(len(o) for o in outputs)
    return GenerationResult(
        text=[tokenizer.decode(o, skip_special_tokens=True) for o in outputs],
        token_ids=outputs,
        prompt_tokens=prompt_len,
        new_tokens=new_tokens,
        kv_tokens=cache.kv_tokens(),
        kv_bytes=cache.kv_bytes,
        kv_bytes_full=cache.kv_bytes_full,
        prefill_seconds=prefill_seconds,
        decode_seconds=decode_seconds,
        seconds=prefill_seconds + decode_seconds,
        tokens_per_second=(new_tokens - 1) / decode_seconds if new_tokens > 1 and decode_seconds > 0 else 0.0,
        policy=policy.name,
        params=policy.params(),
    )
