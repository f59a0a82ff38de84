"""The speculative decode loop: draft a tree, verify it in one forward, keep the longest
matching path, roll the cache back to it.

Lossless by construction: at every accepted position the token is the model's own choice
(greedy argmax, or a sample from its temperature/top-k/top-p distribution, after the repetition
penalty over the prompt and the tokens accepted before it) computed from the hidden state of the
tree node whose ancestors are exactly the accepted prefix; drafts only decide how many of those
choices one forward yields. Stop strings and end-of-sequence ids cut a step's accepted tokens
after the token that completes them, as plain decoding would have stopped there. The output
layer is applied lazily, row by row, to the nodes the walk actually visits (the accepted path
+ 1), so rejected nodes cost only their share of the transformer body.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch

from tokensift.cache import SelectingCache, SelectingLayer
from tokensift.devices import clock, model_device
from tokensift.engine import make_cache
from tokensift.errors import TokensiftError
from tokensift.exact_head import applies as exact_head_applies
from tokensift.exact_head import available as exact_head_available
from tokensift.exact_head import exact_greedy_head
from tokensift.generate import (
    Sampling, choose_next, encode, hits_stop_string, model_context_length, penalize_repeats, resolve_policy,
    sampling_from_config, seen_tokens, stream_prompt,
)
from tokensift.int8_linears import has_int8_linears
from tokensift.kernels import packed_linears
from tokensift.prefill import build_prefill
from tokensift.speculative.adaptive import AcceptanceStats, PromptCalibration, choose_size
from tokensift.speculative.base import Drafter
from tokensift.speculative.cost import CostModel, cost_for
from tokensift.speculative.tree import CandidateTree, DraftTree

DRAFTER_NAMES = ("recycling", "prompt_lookup", "lookahead", "auto")


def build_drafters(name: str, vocab_size: int) -> list[Drafter]:
    """``recycling`` | ``prompt_lookup`` | ``lookahead`` | ``auto`` (all three in one tree)."""
    from tokensift.speculative.lookahead import Lookahead
    from tokensift.speculative.prompt_lookup import PromptLookup
    from tokensift.speculative.recycling import Recycling

    makers = {
        "recycling": lambda: [Recycling(vocab_size)],
        "prompt_lookup": lambda: [PromptLookup()],
        "lookahead": lambda: [Lookahead()],
        "auto": lambda: [PromptLookup(), Lookahead(), Recycling(vocab_size)],
    }
    if name not in makers:
        raise TokensiftError(f"unknown drafter '{name}'; use one of: {', '.join(DRAFTER_NAMES)}")
    return makers[name]()


@dataclass
class SpecResult:
    """What ``Speculator.generate`` returns; ``as_dict()`` is the CLI's JSON."""

    text: str
    token_ids: list[int]
    prompt_tokens: int
    new_tokens: int
    steps: int
    accepted_per_step: float  # tokens emitted per verification forward (accepted drafts + 1)
    tokens_per_second: float
    prefill_seconds: float
    decode_seconds: float
    seconds: float
    drafter: str
    policy: str
    mean_tree_nodes: float
    accepted_by_drafter: dict = field(default_factory=dict)  # accepted draft tokens per drafter
    kv_tokens: float = 0.0
    kv_bytes: int = 0
    params: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)


class Speculator:
    """Draft-free speculative decoding with state (drafters, acceptance history) kept across prompts.

    By default each step verifies the number of nodes that maximises expected tokens per
    measured cost (possibly none); ``fixed_nodes=N``: always the N most likely nodes.
    ``packed=True``: the model's linear layers run on prepacked oneDNN weights while this
    speculator generates (see ``kernels``: a few rows cost about what one row costs).

    Parameters
    ----------
    model : transformers causal language model
        The model to decode with; every layer must be full attention (no sliding window).
    drafter : str or list of Drafter, default "auto"
        A name from ``DRAFTER_NAMES`` (built by :func:`build_drafters`) or drafters to use.
    cost : CostModel or None, default None
        The cost of verifying a tree of each size (None: measured or loaded on first use,
        unless ``fixed_nodes`` is given).
    fixed_nodes : int or None, default None
        Verify always this many of the most likely nodes (None: the cost-aware choice).
    max_nodes : int, default 63
        Most draft nodes verified per step (``fixed_nodes`` replaces it when given).
    stats : AcceptanceStats or None, default None
        Acceptance history to start from (None: a fresh one with its default prior).
    packed : bool, default True
        Run the linear layers on prepacked weights while generating, where available.
    exact_int8_head : bool, default False
        Greedy verification takes each visited node's argmax from an int8 copy of the output
        layer, exactly the fp32 argmax (:mod:`tokensift.exact_head`), on the visited nodes (the
        likeliest path's rows in one int8 call); sampling, a
        repetition penalty or a layer without int8 kernels use the fp32 layer as without it.
    """

    def __init__(self, model, drafter: str | list[Drafter] = "auto", *, cost: CostModel | None = None,
                 fixed_nodes: int | None = None, max_nodes: int = 63, stats: AcceptanceStats | None = None,
                 packed: bool = True, exact_int8_head: bool = False):
        config = model.config.get_text_config(decoder=True)
        layer_types = getattr(config, "layer_types", None) or []
        if any(kind != "full_attention" for kind in layer_types):
            raise TokensiftError("speculative decoding needs a model whose layers are all full attention (no sliding window)")
        if has_int8_linears(model):
            raise TokensiftError("speculative decoding is not lossless over --weights int8 (its per-row activation rounding "
                                 "turns float-rounding differences between a tree and one token into different tokens)")
        self.model = model
        self.name = drafter if isinstance(drafter, str) else "+".join(d.name for d in drafter)
        self.drafters = build_drafters(drafter, config.vocab_size) if isinstance(drafter, str) else list(drafter)
        self.fixed_nodes = fixed_nodes
        self.max_nodes = fixed_nodes if fixed_nodes is not None else max_nodes
        if self.max_nodes < 0:
            raise TokensiftError("the number of tree nodes must be >= 0")
        self.cost = cost
        self.cost_kernels = None  # the kernels self.cost was measured with (None: given, or not yet)
        self.stats = stats or AcceptanceStats()
        self.calibration = PromptCalibration()
        self.predicted = 0.0  # estimated accepted drafts of the tree being verified
        self.head = model.get_output_embeddings()
        self.softcap = getattr(config, "final_logit_softcapping", None)
        self.logit_scale = getattr(config, "logit_scale", None)
        self.packed = packed
        self.exact_int8_head = exact_int8_head
        self.kernels = "stock"  # the body's linears while generating: stock | packed
        self.lazy_head = True  # the output layer row by row on visited nodes (stock kernels); see generate

    def exact_applies(self, temperature: float, penalty: float = 1.0) -> bool:
        """Whether the exact int8 head picks the tokens (asked for, greedy, no penalty, available)."""
        return self.exact_int8_head and exact_head_applies(temperature, penalty) and exact_head_available(self.head)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The output layer on some rows (with the model's logit scale / softcap, if any)."""
        logits = self.head(hidden)
        if self.logit_scale:
            logits = logits * self.logit_scale
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def drafter(self, name: str) -> Drafter:
        return next(d for d in self.drafters if d.name == name)

    # ------------------------------------------------------------------ drafting
    def draft(self, context: list[int]) -> DraftTree:
        if self.max_nodes == 0:
            return DraftTree.chain(context[-1], [])
        tree = CandidateTree(context[-1])
        for drafter in self.drafters:
            drafter.propose(context, tree, self.stats)
        order = tree.ranked()
        probs = [tree.nodes[i].prob for i in order]
        self._steps = getattr(self, "_steps", 0) + 1
        if self.fixed_nodes is not None:
            chosen = order[: self.fixed_nodes]
        elif self.cost is not None and self.cost.online and (1 not in self.cost.trusted() or self._steps % 32 == 0):
            chosen = []  # a plain step now and then: the online cost calibration needs its reference time
        else:
            n, _ = choose_size(self.calibration.scaled(probs), self.cost, self.max_nodes, self.lazy_head)
            if n == 0 and order and self.calibration.probe_due():
                # re-measure this prompt's acceptance with the tree the uncorrected history picks
                n = max(choose_size(probs, self.cost, self.max_nodes, self.lazy_head)[0], 1)
            chosen = order[:n]
        self.predicted = sum(probs[: len(chosen)])
        return tree.subtree(chosen)

    # -------------------------------------------------------------- verification
    def verify(self, tree: DraftTree, cache: SelectingCache, temperature: float, top_p: float,
               generator: torch.Generator, top_k: int = 0, history: torch.Tensor | None = None,
               penalty: float = 1.0) -> tuple[list[int], int]:
        """One forward over the tree; returns (accepted node indices incl. the root, next token).

        ``history`` (``[1, vocab]`` bool, the tokens so far; with ``penalty`` != 1): each node's logits get
        the repetition penalty of exactly its prefix; every token chosen is marked in it."""
        exact = self.exact_applies(temperature, penalty if history is not None else 1.0)
        with exact_greedy_head(self.model, exact):  # the output layer gives exact-argmax rows
            return self._verify(tree, cache, temperature, top_p, generator, top_k, history, penalty, exact)

    def _verify(self, tree: DraftTree, cache: SelectingCache, temperature: float, top_p: float,
                generator: torch.Generator, top_k: int, history: torch.Tensor | None,
                penalty: float, exact: bool = False) -> tuple[list[int], int]:
        q = len(tree)
        seen = cache.get_seq_length()
        device = model_device(self.model)
        ids = torch.tensor([tree.tokens], dtype=torch.long, device=device)
        mask = tree.attention_mask(seen, device) if q > 1 else None
        cache.set_defer_eviction(True)
        out = self.model.model(input_ids=ids, attention_mask=mask, position_ids=tree.position_ids(seen, device),
                               past_key_values=cache, use_cache=True)
        hidden = out.last_hidden_state
        every_row = None if self.lazy_head else self.logits(hidden)[0].float()
        rows, ahead = {}, 1 + round(self.predicted)  # the exact head: rows along the likely path, one call per batch
        node, path = 0, [0]
        while True:
            if every_row is not None:
                logits = every_row[node:node + 1]
            elif exact:
                if node not in rows:
                    chain = tree.likely_chain(node, ahead)  # the int8 weight read once for them all
                    rows.update(zip(chain, self.logits(hidden[:, chain])[0].float()))
                    ahead *= 2
                logits = rows[node][None]
            else:
                logits = self.logits(hidden[:, node:node + 1])[:, 0].float()
            for drafter in self.drafters:
                drafter.observe(tree.tokens[node], logits[0])
            if history is not None:
                logits = penalize_repeats(logits, history, penalty)
            token = int(choose_next(logits, temperature, top_p, generator, top_k)[0])
            if history is not None:
                history[0, token] = True
            children = tree.children(node)
            child = children.get(token)
            for other in children.values():
                for key in tree.sources[other]:
                    self.stats.record(key, other == child)
            if child is None:
                break
            path.append(child)
            node = child
        if every_row is not None:
            self._observe_rejected(tree, path, every_row)
        cache.keep_new_tokens(q, torch.tensor(path, dtype=torch.long, device=device))
        cache.set_defer_eviction(False)
        cache.enforce_budget()
        return path, token

    def _observe_rejected(self, tree: DraftTree, path: list[int], every_row: torch.Tensor) -> None:
        """Show the drafters the rows of the nodes the walk did not visit (computed anyway when the
        output layer ran over every row): Token Recycling refreshes every tree node's successors."""
        visited = {tree.tokens[i] for i in path}  # a token seen on the accepted path keeps that row
        others = [i for i in range(len(tree)) if tree.tokens[i] not in visited]
        if not others:
            return
        tokens = [tree.tokens[i] for i in others]
        rows = every_row[torch.tensor(others, device=every_row.device)]
        for drafter in self.drafters:
            if hasattr(drafter, "observe_rows"):
                drafter.observe_rows(tokens, rows)
            else:  # a duck-typed drafter with only ``observe``: the base class's loop over rows
                Drafter.observe_rows(drafter, tokens, rows)

    # ------------------------------------------------------------------ the loop
    @torch.inference_mode()
    def generate(self, tokenizer, prompt, **options) -> SpecResult:
        """Generate from ``prompt`` (see ``_generate`` for the options), with packed kernels when
        asked for and available; with them the output layer runs once over all tree rows (as
        cheap as one row), without them row by row on the visited nodes."""
        with packed_linears(self.model, self.packed) as packed:
            self.kernels = "packed" if packed else "stock"
            self.lazy_head = not packed
            return self._generate(tokenizer, prompt, **options)

    def _generate(self, tokenizer, prompt, *, policy=None, max_new_tokens: int = 64, temperature: float = 0.0,
                  top_p: float = 1.0, top_k: int = 0, repetition_penalty: float = 1.0, stop_strings=(),
                  generation_config=None, streamer=None, seed: int = 0, stop_at_eos: bool = True,
                  on_token: Callable[[int], None] | None = None, cache: SelectingCache | None = None,
                  prefill_chunk: int | None = None, prefill=None) -> SpecResult:
        """The options of :func:`tokensift.generate.generate` for one prompt: ``generation_config``
        (a transformers ``GenerationConfig``) replaces the sampling settings and stop strings,
        ``streamer`` (``TextStreamer``/``TextIteratorStreamer``) gets each step's accepted tokens."""
        policy = resolve_policy(policy)
        sampling = (sampling_from_config(generation_config, max_new_tokens) if generation_config is not None else
                    Sampling(max_new_tokens, temperature, top_p, top_k, repetition_penalty, tuple(stop_strings)))
        max_new_tokens = sampling.max_new_tokens
        prefill = build_prefill(prefill)
        if prefill.prunes and prefill_chunk is not None:
            raise TokensiftError(f"prefill '{prefill.name}' prefills the whole prompt: drop --prefill-chunk")
        ids = encode(tokenizer, prompt)
        if not ids:
            raise TokensiftError("the prompt is empty")
        limit = model_context_length(self.model)
        if limit and len(ids) + max_new_tokens + self.max_nodes > limit:
            if len(ids) + max_new_tokens > limit:
                raise TokensiftError(f"prompt of {len(ids)} tokens + {max_new_tokens} new tokens exceeds the model's context of {limit} tokens")
            raise TokensiftError(f"a draft tree of {self.max_nodes} nodes does not fit the model's context of {limit} tokens "
                                 f"after {len(ids)} prompt + {max_new_tokens} new tokens")
        exact = self.exact_applies(sampling.temperature, sampling.repetition_penalty)
        self.lazy_head = self.lazy_head or exact  # the exact head runs on the visited nodes only
        kernels = self.kernels + ("-int8head" if exact else "")
        if self.fixed_nodes is None and (self.cost is None or self.cost_kernels not in (None, kernels)):
            with exact_greedy_head(self.model, exact):  # measured once per machine, with the kernels in use
                self.cost, self.cost_kernels = cost_for(self.model, kernels=kernels), kernels
        cache = cache or make_cache(self.model, policy)
        if not isinstance(cache, SelectingCache) or not all(isinstance(layer, SelectingLayer) for layer in cache.layers):
            raise TokensiftError("speculative decoding needs a tokensift SelectingCache over full-attention layers")
        device = model_device(self.model)
        generator = torch.Generator(device=device).manual_seed(seed)
        eos_ids = sampling.eos_token_ids
        if eos_ids is None:
            eos_ids = () if tokenizer.eos_token_id is None else (tokenizer.eos_token_id,)
        eos = set(eos_ids) if stop_at_eos else set()
        penalty = sampling.repetition_penalty
        seen = seen_tokens([ids], self.head.out_features, device) if penalty != 1.0 else None
        stream_prompt(streamer, ids)

        start = clock(device)
        step = prefill_chunk or max(len(ids) - 1, 1)
        pruned = prefill.prunes and len(ids) > 1
        if pruned:  # the prompt but its last token, which the first tree carries
            prefill.run(self.model, cache, torch.tensor([ids[:-1]], device=device))
        for begin in range(0, 0 if pruned else len(ids) - 1, step):
            chunk = ids[begin:min(begin + step, len(ids) - 1)]
            self.model.model(input_ids=torch.tensor([chunk], device=device),
                             position_ids=torch.arange(begin, begin + len(chunk), device=device)[None],
                             past_key_values=cache, use_cache=True)
        context = list(ids)
        self.calibration = PromptCalibration()
        for drafter in self.drafters:
            drafter.begin(context)
        prefill_seconds = clock(device) - start

        decode_start = clock(device)
        output: list[int] = []
        steps, nodes = 0, 0
        accepted_by = {d.name: 0 for d in self.drafters}
        overhead = 0.0
        while len(output) < max_new_tokens:
            t0 = clock(device)
            tree = self.draft(context)
            t1 = clock(device)
            path, token = self.verify(tree, cache, sampling.temperature, sampling.top_p, generator, sampling.top_k,
                                      seen, penalty)
            t2 = clock(device)
            steps += 1
            nodes += len(tree) - 1
            if len(tree) > 1:
                self.calibration.record(self.predicted, len(path) - 1)
            for index in path[1:]:
                for key in tree.sources[index]:
                    accepted_by[key[0]] = accepted_by.get(key[0], 0) + 1
            new = [tree.tokens[i] for i in path[1:]] + [token]
            new = cut_at_stop(tokenizer, output, new[: max_new_tokens - len(output)], eos, sampling.stop_strings)
            output.extend(new)
            context.extend(new)
            for drafter in self.drafters:
                drafter.extend(context, len(new))
            if on_token is not None:
                for t in new:
                    on_token(t)
            if streamer is not None:
                stream_prompt(streamer, new)  # the step's accepted tokens, as a host tensor
            if self.cost is not None and self.cost.online:
                self.cost.observe(len(tree), clock(device) - t0)
                if len(tree) > 1:
                    overhead = 0.9 * overhead + 0.1 * ((t1 - t0) + (clock(device) - t2))
                    self.cost.overhead = overhead
            if new and (new[-1] in eos or (sampling.stop_strings and hits_stop_string(tokenizer, output, sampling.stop_strings))):
                break
        decode_seconds = clock(device) - decode_start
        if streamer is not None:
            streamer.end()
        for drafter in self.drafters:
            drafter.end(context)
        return SpecResult(
            text=tokenizer.decode(output, skip_special_tokens=True),
            token_ids=output,
            prompt_tokens=len(ids),
            new_tokens=len(output),
            steps=steps,
            accepted_per_step=len(output) / max(steps, 1),
            tokens_per_second=len(output) / decode_seconds if decode_seconds > 0 else 0.0,
            prefill_seconds=prefill_seconds,
            decode_seconds=decode_seconds,
            seconds=prefill_seconds + decode_seconds,
            drafter=self.name,
            policy=policy.name,
            mean_tree_nodes=nodes / max(steps, 1),
            accepted_by_drafter=accepted_by,
            kv_tokens=cache.kv_tokens(),
            kv_bytes=cache.kv_bytes,
            params=policy.params(),
        )


def cut_at_stop(tokenizer, output: list[int], new: list[int], eos: set[int], stop_strings) -> list[int]:
    """``new`` up to and including its first token that is an end-of-sequence id or completes a
    stop string (``output`` is what came before): where plain decoding would have stopped."""
    new = next((new[: i + 1] for i, token in enumerate(new) if token in eos), new)
    if stop_strings and hits_stop_string(tokenizer, output + new, stop_strings):
        return next(new[: i + 1] for i in range(len(new)) if hits_stop_string(tokenizer, output + new[: i + 1], stop_strings))
    return new


def speculative_generate(model, tokenizer, prompt, *, speculate: str = "auto", **kwargs) -> SpecResult:
    """One-shot convenience: a fresh ``Speculator`` (no state carried across calls)."""
    options = {k: kwargs.pop(k) for k in ("cost", "fixed_nodes", "max_nodes", "packed", "exact_int8_head") if k in kwargs}
    return Speculator(model, speculate, **options).generate(tokenizer, prompt, **kwargs)
