"""The no-op baseline: keep every token."""

from dataclasses import dataclass

import torch

from tokensift.policies.base import Policy
from tokensift.policies.registry import register


@register
@dataclass
class Full(Policy):
    """Keeps the whole cache; bit-identical to plain ``generate`` (fp32, greedy).

    Parameters
    ----------
    None of its own: it takes no ``budget`` or ``ratio``, and the other common parameters of
    :class:`~tokensift.policies.base.Policy` have no effect (nothing is evicted).
    """

    name = "full"
    paper = "baseline (no compression)"
    evicts = False

    def score(self, layer) -> torch.Tensor:
        return torch.zeros(layer.positions.shape, device=layer.positions.device)
