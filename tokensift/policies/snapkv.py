"""SnapKV: attention of an observation window of recent queries, pooled along the sequence."""

from dataclasses import dataclass

import torch

from tokensift.policies.base import Policy
from tokensift.policies.registry import register
from tokensift.scoring import AttentionView, pool_along_tokens


@register
@dataclass
class SnapKV(Policy):
    """Score = mean attention from the last ``obs_window`` queries, max-pooled (kernel 7).

    Li et al., "SnapKV: LLM Knows What You are Looking for Before Generation", NeurIPS 2024
    (arXiv:2404.14469). The recent queries (kept across decode steps) are re-scored against
    the current cache at each selection, so the budget holds during decoding too.

    Parameters
    ----------
    obs_window : int, default 32
        Recent queries whose attention scores the tokens.
    kernel : int, default 7
        Width of the max-pooling along the tokens (1 or less: no pooling).

    Plus the common parameters of :class:`~tokensift.policies.base.Policy`.
    """

    name = "snapkv"
    paper = "Li et al. 2024, SnapKV: LLM Knows What You are Looking for Before Generation (arXiv:2404.14469)"
    needs_attention = True
    obs_window: int = 32
    kernel: int = 7

    def observe(self, layer, view: AttentionView) -> None:
        rows = view.last_rows(self.obs_window)
        queries = _append_recent(layer.state.get("snap_q"), view.query[:, :, rows], self.obs_window)
        positions = _append_recent(layer.state.get("snap_pos"), view.query_positions[rows], self.obs_window)
        valid = _append_recent(layer.state.get("snap_valid"), view.query_valid[:, rows], self.obs_window)
        layer.state.update(snap_q=queries, snap_pos=positions, snap_valid=valid, snap_scaling=view.scaling)

    def score(self, layer) -> torch.Tensor:
        view = AttentionView(
            query=layer.state["snap_q"],
            keys=layer.keys,
            key_valid=layer.valid,
            key_positions=layer.positions,
            query_positions=layer.state["snap_pos"],
            query_valid=layer.state["snap_valid"],
            scaling=layer.state["snap_scaling"],
        )
        weights = view.query_valid.float()
        probs = view.probs(slice(None))
        mean = torch.einsum("bhrk,br->bhk", probs, weights) / weights.sum(1).clamp(min=1)[:, None, None]
        return pool_along_tokens(mean, self.kernel)


def _append_recent(old: torch.Tensor | None, new: torch.Tensor, keep: int) -> torch.Tensor:
    """Concatenate along the last query axis and keep the newest ``keep`` entries."""
    axis = 2 if new.dim() == 4 else new.dim() - 1
    merged = new if old is None else torch.cat([old, new], dim=axis)
    return merged.narrow(axis, max(merged.shape[axis] - keep, 0), min(merged.shape[axis], keep))
