"""VisionZip: dominant tokens kept as they are, the rest merged into contextual tokens."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Selection, SelectorBase, cosine_matrix, gather_tokens, importance, topk_sorted
from .registry import register


@register
@dataclass
class VisionZip(SelectorBase):
    """Keep the most-attended ``dominant_fraction`` of the budget; merge the others into the rest.

    "VisionZip: Longer is Better but Not Necessary in Vision Language Models"
    (CVPR 2025). Contextual targets are spread uniformly over the remaining tokens; every other
    remaining token joins its most similar target (cosine) and targets become size-weighted means.

    Parameters
    ----------
    dominant_fraction : float, default 0.85
        Share of the budget kept as dominant tokens (at least 1); the rest are contextual tokens.
    """

    name = "visionzip"
    merges = True
    uses_attention = True
    dominant_fraction: float = 0.85

    def select(self, tokens, budget, scores=None, layer_scores=None, text=None) -> Selection:
        B, N, _ = tokens.shape
        n_dom = min(budget, max(1, round(budget * self.dominant_fraction))) if budget < N else N
        n_ctx = budget - n_dom
        score = importance(tokens, scores, layer_scores)
        dominant = topk_sorted(score, n_dom)
        if n_ctx == 0:
            return Selection(dominant)
        rest = _complement(dominant, N)
        targets = rest[:, torch.linspace(0, rest.shape[1] - 1, n_ctx, device=rest.device).round().long()]
        return _merge_into(tokens, dominant, rest, targets)


def _complement(indices: torch.Tensor, n: int) -> torch.Tensor:
    """Sorted indices ``[B, n - k]`` not in ``indices`` ``[B, k]``."""
    mask = torch.ones(indices.shape[0], n, dtype=torch.bool, device=indices.device)
    mask.scatter_(1, indices, False)
    return torch.nonzero(mask)[:, 1].view(indices.shape[0], -1)


def _merge_into(tokens, dominant, rest, targets) -> Selection:
    """Assign each ``rest`` token to its most similar target; average; return the full selection."""
    B, N, D = tokens.shape
    sim = cosine_matrix(gather_tokens(tokens, rest), gather_tokens(tokens, targets))
    is_target = (rest.unsqueeze(-1) == targets.unsqueeze(1))
    sim = sim.masked_fill(is_target.any(-1, keepdim=True) & ~is_target, -2.0)
    assign = sim.argmax(dim=-1)
    sums = torch.zeros(B, targets.shape[1], D, dtype=torch.float32, device=tokens.device)
    sums.scatter_add_(1, assign.unsqueeze(-1).expand(-1, -1, D), gather_tokens(tokens, rest).float())
    counts = torch.zeros(B, targets.shape[1], device=tokens.device).scatter_add_(1, assign, torch.ones_like(assign, dtype=torch.float32))
    indices = torch.cat([dominant, targets], dim=1)
    feats = torch.cat([gather_tokens(tokens, dominant).float(), sums / counts.unsqueeze(-1)], dim=1)
    sizes = torch.cat([torch.ones_like(dominant, dtype=torch.float32), counts], dim=1)
    order = torch.argsort(indices, dim=1)
    return Selection(
        torch.gather(indices, 1, order),
        gather_tokens(feats, order).to(tokens.dtype),
        torch.gather(sizes, 1, order),
    )
