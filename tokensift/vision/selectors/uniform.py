"""Uniform baseline: regular grid subsampling that keeps spatial coverage."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .base import Selection, SelectorBase
from .registry import register


@register
@dataclass
class Uniform(SelectorBase):
    """Keep a regular sub-grid of the patch grid (square grid assumed unless ``grid`` is given).

    Baseline used across the visual-token pruning literature (e.g. in DivPrune and FasterVLM).
    When the sub-grid has more points than the budget, points are dropped evenly.

    Parameters
    ----------
    grid : tuple of (int, int) or None, default None
        Patch grid as ``(rows, columns)`` (None: square when the token count is a perfect
        square, else one row). When ``rows * columns`` is not the token count, evenly spaced
        indices in raster order are kept instead.
    """

    name = "uniform"
    grid: tuple[int, int] | None = None

    def select(self, tokens, budget, scores=None, layer_scores=None, text=None) -> Selection:
        B, N, _ = tokens.shape
        idx = grid_indices(N, budget, self.grid)
        return Selection(idx.to(tokens.device).unsqueeze(0).expand(B, -1).contiguous())


def grid_indices(n: int, k: int, grid: tuple[int, int] | None = None) -> torch.Tensor:
    """``k`` raster indices spread evenly over an ``h x w`` grid of ``n`` cells."""
    h, w = grid or _square(n)
    if h * w != n:
        return torch.linspace(0, n - 1, k, device="cpu").round().long()
    gh = min(h, max(1, math.ceil(math.sqrt(k * h / w))))
    gw = min(w, math.ceil(k / gh))
    rows = ((torch.arange(gh, device="cpu") + 0.5) * h / gh).long()  # host indices, moved by the caller
    cols = ((torch.arange(gw, device="cpu") + 0.5) * w / gw).long()
    points = (rows[:, None] * w + cols[None, :]).flatten()
    keep = torch.linspace(0, len(points) - 1, k, device="cpu").round().long()
    return torch.sort(points[keep]).values


def _square(n: int) -> tuple[int, int]:
    """``(s, s)`` when ``n`` is a perfect square, else ``(1, n)``."""
    s = math.isqrt(n)
    return (s, s) if s * s == n else (1, n)
