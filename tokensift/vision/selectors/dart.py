"""DART: keep the tokens least duplicated with a few pivot tokens."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Selection, SelectorBase, cosine_matrix, topk_sorted
from .registry import register


@register
@dataclass
class DART(SelectorBase):
    """Pick ``n_pivots`` pivots by feature norm; keep pivots + tokens with lowest max-cosine to them.

    "Stop Looking for Important Tokens in Multimodal Language Models: Duplication
    Matters More" (DART).

    Parameters
    ----------
    n_pivots : int, default 8
        Pivot tokens (largest feature norm), always kept; capped at the budget, at least 1.
    """

    name = "dart"
    n_pivots: int = 8

    def select(self, tokens, budget, scores=None, layer_scores=None, text=None) -> Selection:
        n_piv = max(1, min(self.n_pivots, budget))
        pivots = topk_sorted(tokens.float().norm(dim=-1), n_piv)
        dup = cosine_matrix(tokens, _rows(tokens, pivots)).max(dim=-1).values
        dup.scatter_(1, pivots, -torch.inf)
        return Selection(topk_sorted(-dup, budget))


def _rows(tokens, idx):
    """``tokens[b, idx[b]]``."""
    return torch.gather(tokens, 1, idx.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
