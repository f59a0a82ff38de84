"""Random eviction: the floor every method must beat."""

from dataclasses import dataclass

import torch

from tokensift.policies.base import Policy
from tokensift.policies.registry import register


@register
@dataclass
class RandomPolicy(Policy):
    """Keeps a random subset (plus sinks and the recent window).

    Each token gets a fixed pseudo-random priority from (seed, layer, head, real-token rank), so the
    choice is reproducible and does not depend on batch shape or on when selection runs.

    Parameters
    ----------
    seed : int, default 0
        Changes every token's priority (another random subset).

    Plus the common parameters of :class:`~tokensift.policies.base.Policy`.
    """

    name = "random"
    paper = "baseline (random selection)"
    seed: int = 0

    def score(self, layer) -> torch.Tensor:
        heads = torch.arange(layer.ranks.shape[1], device=layer.ranks.device)[None, :, None]
        mix = layer.ranks.double() * 12.9898 + heads * 78.233 + layer.layer_idx * 37.719 + self.seed * 4.1414
        return torch.frac(torch.sin(mix) * 43758.5453).abs().float()
