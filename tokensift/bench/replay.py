"""Prefill once, compress many ways: the benchmark's work sharing.

A policy that compresses after prefill sees, during a one-shot prefill, exactly: the prompt's
K/V appended to each layer, its queries, then ``observe`` and ``enforce_budget``. The prefill's
logits do not depend on the policy. So one full prefill that records every layer's queries
serves every such policy: :func:`replay` rebuilds the cache each policy would have produced,
identical to a fresh prefill under that policy (tested), at the cost of re-scoring only.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from tokensift.attention import attention_step, attention_view
from tokensift.cache import SelectingCache, SelectingLayer
from tokensift.engine import make_cache
from tokensift.policies import build_policy
from tokensift.tokens import TokenStore


@dataclass
class Recording:
    """One prompt's prefill: per layer K/V and (selecting layers) queries + scaling, and logits."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    queries: dict[int, tuple[torch.Tensor, float]]
    logits: torch.Tensor  # [batch, vocab] at the last prompt position
    input_ids: torch.Tensor
    views: dict = field(default_factory=dict, repr=False)  # layer -> shared AttentionView (memoized sums)

    @property
    def length(self) -> int:
        return self.input_ids.shape[1]


@torch.inference_mode()
def record_prefill(model, input_ids: torch.Tensor) -> Recording:
    """Prefill ``input_ids`` (no padding) with the full cache, keeping what replay needs."""
    cache = make_cache(model, build_policy("full"))
    queries: dict = {}
    cache.shared["record_queries"] = queries
    cache.shared["input_ids"] = input_ids
    out = model(input_ids=input_ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
    keys = [layer.keys for layer in cache.layers]
    values = [layer.values for layer in cache.layers]
    return Recording(keys, values, queries, out.logits[:, -1].float(), input_ids)


def replay(model, policy, recording: Recording) -> SelectingCache:
    """The cache ``policy`` would hold after prefilling ``recording``'s prompt in one pass."""
    cache = make_cache(model, policy)
    cache.shared["input_ids"] = recording.input_ids
    batch, length = recording.input_ids.shape
    valid = torch.ones(batch, length, dtype=torch.bool, device=recording.input_ids.device)
    for index, layer in enumerate(cache.layers):
        keys, values = recording.keys[index], recording.values[index]
        layer.update(keys, values)
        if hasattr(layer, "cumulative_length"):  # a sliding-window layer was given only its window: the true count
            layer.cumulative_length = length
        if isinstance(layer, SelectingLayer):
            query, scaling = recording.queries[index]
            attention_step(layer, query, valid, scaling,
                           view_of=lambda: shared_view(recording, index, layer, query, valid, scaling))
    return cache


def shared_view(recording: Recording, index: int, layer: SelectingLayer, query, valid, scaling):
    """One AttentionView per layer and prompt, so attention sums are computed once for all policies."""
    if index not in recording.views:
        recording.views[index] = attention_view(layer, query, valid, scaling)
    return recording.views[index]


def merge_caches(caches: list[SelectingCache], model) -> SelectingCache:
    """Stack single-sequence caches (same prompt, different selections) into one batch.

    Rows hold different numbers of tokens: shorter rows are padded with invalid slots, which
    attention never reads. The merged cache keeps everything from now on (``full`` policy):
    the benchmark appends the question and the answer without further eviction.
    """
    merged = make_cache(model, build_policy("full"))
    for index, layer in enumerate(merged.layers):
        sources = [cache.layers[index] for cache in caches]
        if isinstance(layer, SelectingLayer):
            _merge_selecting(layer, sources)
        else:
            layer.update(torch.cat([s.keys for s in sources]), torch.cat([s.values for s in sources]))
            if hasattr(layer, "cumulative_length"):  # sliding-window layer: tokens seen, not held
                layer.cumulative_length = sources[0].cumulative_length
    return merged


def _merge_selecting(target: SelectingLayer, sources: list[SelectingLayer]) -> None:
    """``target`` holds the sources' sequences one after another (shorter ones padded with invalid slots)."""
    store = TokenStore.stack([source.tokens() for source in sources])
    target.adopt(store, torch.cat([source.valid_seen for source in sources]), sources[0].seen)
