"""Continuous batching on the selecting cache: stack rows of several caches into one left-padded
batch (a request joining), or keep some rows of one (requests leaving).

A row's real tokens always end at the batch's last position (decode steps add one token to
every row), so a row of ``valid_seen`` real tokens occupies the last ``valid_seen`` positions of
the padded sequence. Repacking strips each row's padding slots, re-pads every row on the left to
the longest, and shifts stored positions so the new padded sequence is ``max(valid_seen)`` long:
the result is the state a left-padded batch of those rows would have had. Only caches whose
layers are plain :class:`SelectingLayer` with no per-batch policy state can be repacked (see
:func:`mergeable`); the others run as their own batch.
"""

from __future__ import annotations

import torch

from tokensift.cache import SelectingCache, SelectingLayer
from tokensift.engine import make_cache
from tokensift.tokens import TokenStore


def mergeable(cache: SelectingCache) -> bool:
    """Whether rows of ``cache`` can move between batches: every layer a plain selecting layer,
    no per-batch policy state (queries kept by SnapKV, sparse selections...), and a budget that
    does not depend on the batch (a ``ratio`` budget follows the longest row)."""
    policy = cache.policy
    if not batch_independent(policy) or policy.reads_subset:
        return False
    if set(cache.shared) - {"input_ids"}:
        return False
    return all(type(layer) is SelectingLayer and not layer.state for layer in cache.layers)


def batch_independent(policy) -> bool:
    """Whether a row's selection ignores the other rows: not so with a ``ratio`` budget (taken of
    the longest row's tokens)."""
    while policy is not None:
        if policy.ratio is not None:
            return False
        policy = policy.inner
    return True


def row_lengths(cache: SelectingCache) -> list[int]:
    """Real tokens seen by each row."""
    return [int(n) for n in cache.selecting_layers[0].valid_seen]


def padding_mask(lengths: list[int], device=None) -> torch.Tensor:
    """The ``[batch, max(lengths)]`` attention mask of right-aligned rows."""
    longest = max(lengths)
    mask = torch.zeros(len(lengths), longest, dtype=torch.long, device=device)
    for row, length in enumerate(lengths):
        mask[row, longest - length:] = 1
    return mask


def repack(model, policy, rows: list[tuple[SelectingCache, int]]) -> SelectingCache:
    """A new cache (under ``policy``) holding the given ``(cache, row)`` pairs, in that order."""
    lengths = [int(cache.selecting_layers[0].valid_seen[row]) for cache, row in rows]
    seen = max(lengths)
    merged = make_cache(model, policy)
    for index, layer in enumerate(merged.layers):
        sources = [(cache.layers[index], row) for cache, row in rows]
        _fill_layer(layer, sources, lengths, seen)
    return merged


def _row_slots(layer: SelectingLayer, row: int) -> torch.Tensor:
    """Indices of the row's slots that hold a real token in at least one KV head."""
    return layer.valid[row].any(dim=0).nonzero().flatten()


def _fill_layer(target: SelectingLayer, sources: list[tuple[SelectingLayer, int]], lengths: list[int], seen: int) -> None:
    """``target`` holds each source row's real slots, left-padded to the longest, at positions
    shifted so that every row's real tokens end at ``seen``."""
    pieces = []
    for (layer, row), length in zip(sources, lengths):
        piece = layer.tokens().row(row, _row_slots(layer, row))
        piece["positions"] = piece["positions"] + (seen - length) - (layer.seen - int(layer.valid_seen[row]))
        pieces.append(piece)
    first = sources[0][0]
    valid_seen = torch.tensor(lengths, dtype=torch.long, device=first.device)
    target.adopt(TokenStore.stack(pieces, pad_left=True), valid_seen, seen,
                 compressed=any(layer.compressed for layer, _ in sources))
