"""MMTok: greedy maximum coverage of the visual set and (when given) the text."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Selection, SelectorBase, cosine_matrix
from .registry import register


@register
@dataclass
class MMTok(SelectorBase):
    """Facility-location coverage ``sum_j max_{i in S} sim(i, j)`` over visual (+ text) targets.

    "MMTok: Multimodal Coverage Maximization for Efficient Inference of VLMs".
    Greedy selection has the (1 - 1/e) guarantee of monotone submodular maximization.
    Similarities are cosines clipped at 0; text targets are weighted by ``text_weight``.

    Parameters
    ----------
    text_weight : float, default 1.0
        Scale of the similarities to the text targets (used only when text embeddings of the
        tokens' width are given; 0: cover the visual set alone).
    """

    name = "mmtok"
    text_weight: float = 1.0

    def select(self, tokens, budget, scores=None, layer_scores=None, text=None) -> Selection:
        sim = cosine_matrix(tokens).clamp_min(0)
        if text is not None and text.shape[-1] == tokens.shape[-1]:
            sim_text = cosine_matrix(tokens, text).clamp_min(0) * self.text_weight
            sim = torch.cat([sim, sim_text], dim=-1)
        return Selection(_greedy_cover(sim, budget))


def _greedy_cover(sim: torch.Tensor, k: int) -> torch.Tensor:
    """Greedy facility location on ``sim`` ``[B, N, M]`` (candidates x targets)."""
    B, N, M = sim.shape
    rows = torch.arange(B, device=sim.device)
    covered = torch.zeros(B, M, device=sim.device)
    taken = torch.zeros(B, N, dtype=torch.bool, device=sim.device)
    chosen = []
    for _ in range(k):
        gain = (sim - covered.unsqueeze(1)).clamp_min(0).sum(dim=-1)
        gain = gain.masked_fill(taken, -1.0)
        best = gain.argmax(dim=-1)
        chosen.append(best)
        taken[rows, best] = True
        covered = torch.maximum(covered, sim[rows, best])
    return torch.sort(torch.stack(chosen, dim=1), dim=1).values
