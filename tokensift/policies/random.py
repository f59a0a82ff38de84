"""Random eviction: the floor every method must beat."""

from dataclasses import dataclass

import torch

from tokensift.policies.base import Policy
from tokensift.policies.registry import register


@register
@dataclass
class RandomPolicy(Policy):
    """Keeps a random subset (plus sinks and the recent window), reproducible from ``seed``."""

    name = "random"
    paper = "baseline (random selection)"
    seed: int = 0

    def score(self, layer) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + layer.layer_idx * 1_009 + layer.seen)
        return torch.rand(layer.positions.shape, generator=generator).to(layer.positions.device)
