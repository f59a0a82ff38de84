"""PyramidKV: more cache in the lower layers, less in the upper ones."""

from dataclasses import dataclass

from tokensift.errors import TokensiftError
from tokensift.policies.base import Policy
from tokensift.policies.registry import register
from tokensift.policies.wrapper import Wrapper


@register
@dataclass
class PyramidKV(Wrapper):
    """Wrapper: per-layer budgets decreasing linearly with depth, any inner scorer.

    Cai et al., "PyramidKV: Dynamic KV Cache Compression based on Pyramidal Information
    Funneling" (2024, arXiv:2406.02069). Budgets form an arithmetic sequence from layer 0
    (largest) to the last layer (smallest, ``mean / beta`` but never below the protected
    tokens + 1), whose mean over the layers is the given budget (rounded so that the sum is
    exact). With ``ratio``, the mean is the ratio's budget for the tokens seen so far.

    Parameters
    ----------
    inner : Policy, str or None, default "snapkv"
        The policy that scores tokens in each layer (a policy, a name or an expression).
    beta : float, default 20.0
        The last layer's budget is the mean budget divided by ``beta`` (>= 1; 1: equal budgets).

    Plus the common parameters of :class:`~tokensift.policies.base.Policy`.
    """

    name = "pyramidkv"
    paper = "Cai et al. 2024, PyramidKV: Dynamic KV Cache Compression based on Pyramidal Information Funneling (arXiv:2406.02069)"
    inner: Policy | str | None = "snapkv"  # the wrapped policy (a name or an expression)
    beta: float = 20.0

    def validate(self) -> None:
        super().validate()
        if self.beta < 1.0:
            raise TokensiftError(f"pyramidkv: beta must be >= 1 (got {self.beta})")

    def layer_budget(self, layer_idx: int, num_layers: int, seen: int) -> int | None:
        mean = self.inner.layer_budget(layer_idx, num_layers, seen)
        if mean is None:
            return None
        return pyramid_budgets(mean, num_layers, self.beta, self.protected + 1)[layer_idx]


def pyramid_budgets(mean: int, num_layers: int, beta: float, floor: int) -> list[int]:
    """Integer budgets, decreasing linearly with depth, summing to ``mean * num_layers``."""
    if num_layers == 1:
        return [mean]
    low = min(max(mean / beta, floor), mean)
    high = 2 * mean - low
    real = [high - (high - low) * i / (num_layers - 1) for i in range(num_layers)]
    cumulative = [0.0]
    for value in real:
        cumulative.append(cumulative[-1] + value)
    return [round(cumulative[i + 1]) - round(cumulative[i]) for i in range(num_layers)]
