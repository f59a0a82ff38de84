"""VATP: accumulated attention times the l1 norm of the value vector."""

from dataclasses import dataclass

import torch

from tokensift.policies.base import Policy
from tokensift.policies.registry import register
from tokensift.scoring import pad_to


@register
@dataclass
class VATP(Policy):
    """Score = (attention the token received, summed over queries as in H2O) x ||v||_1.

    Guo et al., "Attention Score is not All You Need for Token Importance Indicator in KV Cache
    Reduction: Value Also Matters" (2024, arXiv:2406.12335). Tokens with large attention but a
    near-zero value vector (sinks, often) contribute little to the output; the value norm
    corrects for that. Per KV head: the value vector is that head's.

    Parameters
    ----------
    Only the common parameters of :class:`~tokensift.policies.base.Policy`.
    """

    name = "vatp"
    paper = "Guo et al. 2024, Attention Score is not All You Need ... Value Also Matters (arXiv:2406.12335)"
    needs_attention = True

    def observe(self, layer, view) -> None:
        running = pad_to(layer.token_state.get("vatp"), layer.kept, layer.keys)
        layer.token_state["vatp"] = running + view.column_sum()

    def score(self, layer) -> torch.Tensor:
        return layer.token_state["vatp"] * value_l1_norm(layer.values)


def value_l1_norm(values: torch.Tensor) -> torch.Tensor:
    """``[batch, heads, kept]`` l1 norm of each value vector (fp32)."""
    return values.float().abs().sum(dim=-1)
