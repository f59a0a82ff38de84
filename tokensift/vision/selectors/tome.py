"""ToMe: bipartite soft matching, merging similar tokens by size-weighted averaging."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Selection, SelectorBase, cosine_matrix, gather_tokens
from .registry import register


@register
@dataclass
class ToMe(SelectorBase):
    """Token Merging: alternate tokens into sets A/B, merge the ``r`` most similar A->B pairs.

    Bolya et al., "Token Merging: Your ViT But Faster" (ICLR 2023). As a selector it repeats
    bipartite rounds on the given tokens until the budget is met. Inside a ViT
    (``run_vit(method="tome")``) it merges a few tokens after every layer using that layer's
    keys, with proportional attention (``log(size)`` added to the attention logits).

    Parameters
    ----------
    None.
    """

    name = "tome"
    merges = True

    def select(self, tokens, budget, scores=None, layer_scores=None, text=None) -> Selection:
        B, N, _ = tokens.shape
        state = MergeState.start(tokens, tokens)
        state = merge_to(state, budget)
        return Selection(state.index, state.x.to(tokens.dtype), state.sizes)


@dataclass
class MergeState:
    """Tokens being merged: features ``x``, similarity ``metric``, ``sizes``, original ``index``."""

    x: torch.Tensor
    metric: torch.Tensor
    sizes: torch.Tensor
    index: torch.Tensor

    @classmethod
    def start(cls, x: torch.Tensor, metric: torch.Tensor) -> "MergeState":
        """All tokens unmerged (size 1), indexed ``0..N-1``."""
        B, N, _ = x.shape
        index = torch.arange(N, device=x.device).expand(B, N).contiguous()
        return cls(x, metric, torch.ones(B, N, device=x.device), index)


def merge_to(state: MergeState, target: int) -> MergeState:
    """Bipartite rounds until ``target`` tokens remain (each round merges at most half)."""
    while state.x.shape[1] > target:
        n = state.x.shape[1]
        state = bipartite_merge(state, min(n - target, n // 2))
    return state


def bipartite_merge(state: MergeState, r: int) -> MergeState:
    """One ToMe round: merge the ``r`` best-matched tokens of set A (even) into set B (odd)."""
    if r <= 0:
        return state
    a, b = _split(state)
    sim = cosine_matrix(a.metric, b.metric)
    best_val, best_b = sim.max(dim=-1)
    order = torch.sort(best_val, dim=-1, descending=True, stable=True).indices
    src, keep = order[:, :r], order[:, r:]
    dst = torch.gather(best_b, 1, src)
    merged_b = _scatter_merge(b, _take(a, src), dst)
    return _sorted(_concat(_take(a, keep), merged_b))


def _split(state: MergeState) -> tuple[MergeState, MergeState]:
    """Alternating split: even positions form A, odd positions form B."""
    n = state.x.shape[1]
    dev = state.x.device
    a_idx, b_idx = torch.arange(0, n, 2, device=dev), torch.arange(1, n, 2, device=dev)
    def pick(idx):
        return MergeState(state.x[:, idx], state.metric[:, idx], state.sizes[:, idx], state.index[:, idx])

    return pick(a_idx), pick(b_idx)


def _take(state: MergeState, idx: torch.Tensor) -> MergeState:
    """Rows ``idx`` ``[B, k]`` of every field."""
    return MergeState(gather_tokens(state.x, idx), gather_tokens(state.metric, idx),
                      torch.gather(state.sizes, 1, idx), torch.gather(state.index, 1, idx))


def _scatter_merge(b: MergeState, src: MergeState, dst: torch.Tensor) -> MergeState:
    """Size-weighted average of ``src`` tokens into their destinations ``dst`` in ``b``."""
    def wsum(base, add):
        out = (base.float() * b.sizes.unsqueeze(-1)).clone()
        idx = dst.unsqueeze(-1).expand(-1, -1, add.shape[-1])
        return out.scatter_add_(1, idx, add.float() * src.sizes.unsqueeze(-1))
    sizes = b.sizes.clone().scatter_add_(1, dst, src.sizes)
    x = (wsum(b.x, src.x) / sizes.unsqueeze(-1)).to(b.x.dtype)
    metric = (wsum(b.metric, src.metric) / sizes.unsqueeze(-1)).to(b.metric.dtype)
    return MergeState(x, metric, sizes, b.index)


def _concat(a: MergeState, b: MergeState) -> MergeState:
    """Concatenate two states along the token axis."""
    return MergeState(torch.cat([a.x, b.x], 1), torch.cat([a.metric, b.metric], 1),
                      torch.cat([a.sizes, b.sizes], 1), torch.cat([a.index, b.index], 1))


def _sorted(state: MergeState) -> MergeState:
    """Reorder tokens by their original index."""
    order = torch.argsort(state.index, dim=1)
    return _take(state, order)
