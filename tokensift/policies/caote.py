"""CAOTE: evict the tokens whose removal changes the attention output least."""

from dataclasses import dataclass

import torch

from tokensift.policies.base import Policy
from tokensift.policies.registry import register
from tokensift.policies.wrapper import Wrapper, valid_scores

EPS = 1e-6


@register
@dataclass
class CAOTE(Wrapper):
    """Wrapper: turn an attention-score policy's scores into attention-output errors.

    "CAOTE: KV Caching through Attention Output Error based Token Eviction" (2025; the seed
    listing gives no authors or arXiv id). The inner policy's scores, normalized per KV head to
    sum to one over the kept tokens, are the attention weights ``a`` of its observation
    queries (their mean attention for snapkv/tova, the accumulated or decayed sum for
    h2o/a2sf); ``o = sum_j a_j v_j`` is the matching attention output. Removing token j
    turns the output into ``(o - a_j v_j) / (1 - a_j)``, an error of
    ``a_j / (1 - a_j) * ||v_j - o||``: tokens with the smallest error are evicted first.
    Works with any inner policy whose scores are non-negative attention mass.

    Parameters
    ----------
    inner : Policy, str or None, default "h2o"
        The policy whose scores are read as attention weights (a policy, a name or an expression).

    Plus the common parameters of :class:`~tokensift.policies.base.Policy`.
    """

    name = "caote"
    paper = "CAOTE: KV Caching through Attention Output Error based Token Eviction (2025)"
    inner: Policy | str | None = "h2o"  # the wrapped policy (a name or an expression)
    needs_attention = True
    default_inner = "h2o"

    def score(self, layer) -> torch.Tensor:
        weights = attention_weights(valid_scores(self.inner.score(layer), layer))
        return output_error(weights, layer.values.float())


def attention_weights(scores: torch.Tensor) -> torch.Tensor:
    """Non-negative scores normalized to sum to one per ``[batch, head]`` row."""
    scores = scores.clamp(min=0.0)
    return scores / scores.sum(dim=-1, keepdim=True).clamp(min=EPS)


def output_error(weights: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``a_j / (1 - a_j) * ||v_j - o||`` with ``o = sum_j a_j v_j`` (per batch row and KV head)."""
    output = torch.einsum("bhk,bhkd->bhd", weights, values)
    distance = (values - output[:, :, None, :]).norm(dim=-1)
    return weights / (1.0 - weights).clamp(min=EPS) * distance
