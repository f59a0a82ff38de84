"""DivPrune: max-min diversity selection of visual tokens."""

from __future__ import annotations

from dataclasses import dataclass

from .base import Selection, SelectorBase, cosine_matrix, greedy_farthest
from .registry import register


@register
@dataclass
class DivPrune(SelectorBase):
    """Max-Min Diversity Problem solved greedily on cosine distance between token features.

    "DivPrune: Diversity-based Visual Token Pruning for Large Multimodal Models"
    (CVPR 2025). The first token is the most isolated one (largest distance to its nearest
    neighbour); each next token maximizes its minimum distance to those already chosen.

    Parameters
    ----------
    None.
    """

    name = "divprune"

    def select(self, tokens, budget, scores=None, layer_scores=None, text=None) -> Selection:
        dist = 1.0 - cosine_matrix(tokens)
        nearest = dist + 4.0 * torch_eye_like(dist)
        first = nearest.min(dim=-1).values.argmax(dim=-1)
        return Selection(greedy_farthest(dist, first, budget))


def torch_eye_like(dist):
    """Identity matrices shaped like ``dist`` ``[B, N, N]`` (to ignore self-distance)."""
    import torch

    return torch.eye(dist.shape[-1], dtype=dist.dtype, device=dist.device).expand_as(dist)
