"""Random baseline: a seeded random subset of visual tokens."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Selection, SelectorBase
from .registry import register


@register
@dataclass
class RandomSelect(SelectorBase):
    """Uniformly random kept set (deterministic for a given ``seed``). A floor for every method.

    Parameters
    ----------
    seed : int, default 0
        Seed of the generator that draws each batch row's random permutation.
    """

    name = "random"
    seed: int = 0

    def select(self, tokens, budget, scores=None, layer_scores=None, text=None) -> Selection:
        gen = torch.Generator().manual_seed(self.seed)
        B, N, _ = tokens.shape
        picks = torch.stack([torch.randperm(N, generator=gen, device="cpu")[:budget] for _ in range(B)])
        return Selection(torch.sort(picks, dim=1).values.to(tokens.device))
