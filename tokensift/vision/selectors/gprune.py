"""G-Prune: propagate importance over a token similarity graph, keep the top nodes."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Selection, SelectorBase, cosine_matrix, importance, topk_sorted
from .registry import register


@register
@dataclass
class GPrune(SelectorBase):
    """Graph over tokens (cosine edges above ``threshold``); ``s <- a W s + (1 - a) s0``; top-k.

    "What Kind of Visual Tokens Do We Need? Training-free Visual Token Pruning for Multi-modal
    Large Language Models from the Perspective of Graph" (G-Prune). ``s0`` is [CLS] attention
    (or the proxy score).

    Parameters
    ----------
    threshold : float, default 0.5
        Cosine similarity above which two tokens share an edge (weighted by that cosine).
    alpha : float, default 0.5
        Weight ``a`` of the propagated score against the initial score ``s0`` at each step.
    iterations : int, default 3
        Propagation steps over the graph (0: the top-k of ``s0`` itself).
    """

    name = "gprune"
    uses_attention = True
    threshold: float = 0.5
    alpha: float = 0.5
    iterations: int = 3

    def select(self, tokens, budget, scores=None, layer_scores=None, text=None) -> Selection:
        s0 = importance(tokens, scores, layer_scores)
        s0 = s0 / s0.sum(dim=-1, keepdim=True).clamp_min(1e-12)
        sim = cosine_matrix(tokens)
        weights = torch.where(sim > self.threshold, sim, torch.zeros_like(sim))
        weights = weights / weights.sum(dim=1, keepdim=True).clamp_min(1e-12)
        s = s0
        for _ in range(self.iterations):
            s = self.alpha * (weights @ s.unsqueeze(-1)).squeeze(-1) + (1 - self.alpha) * s0
        return Selection(topk_sorted(s, budget))
