"""Ada-KV: one budget per layer, split across its KV heads by score."""

from dataclasses import dataclass

import torch

from tokensift.errors import TokensiftError
from tokensift.policies.base import Policy
from tokensift.policies.registry import register
from tokensift.policies.wrapper import Wrapper


@register
@dataclass
class AdaKV(Wrapper):
    """Wrapper: per-head adaptive budgets, memory really freed (variable-length heads).

    Feng et al., "Ada-KV: Optimizing KV Cache Eviction by Adaptive Budget Allocation for
    Efficient LLM Inference" (2024, arXiv:2407.11550). A layer keeps ``budget x kv_heads``
    tokens per sequence: the top of all its heads' inner scores flattened together, so heads
    with concentrated attention give slots to heads with spread-out attention. Each head first
    gets its protected tokens and a guaranteed share of ``floor x (budget - protected)`` of its
    own best tokens (Ada-KV's safeguard). Heads then hold different numbers of tokens
    (:class:`~tokensift.storage.varlen.VarlenLayer`, which asks :meth:`keep_across_heads`).
    Scores must be comparable across heads (attention mass is; snapkv, h2o, tova, caote,
    graphkv all qualify).

    Parameters
    ----------
    inner : Policy, str or None, default "snapkv"
        The policy whose scores are split across heads (a policy, a name or an expression).
    floor : float, default 0.2
        Fraction of each head's unprotected budget it is guaranteed (0: none, 1: equal heads).

    Plus the common parameters of :class:`~tokensift.policies.base.Policy`.
    """

    name = "adakv"
    paper = "Feng et al. 2024, Ada-KV: Optimizing KV Cache Eviction by Adaptive Budget Allocation (arXiv:2407.11550)"
    storage = "tokensift.storage.varlen:VarlenLayer"
    inner: Policy | str | None = "snapkv"  # the wrapped policy (a name or an expression)
    floor: float = 0.2

    def validate(self) -> None:
        super().validate()
        if not 0.0 <= self.floor <= 1.0:
            raise TokensiftError(f"adakv: floor must be in [0, 1] (got {self.floor})")

    def keep_across_heads(self, layer, budget: int) -> torch.Tensor:
        """``[batch, heads, slots]`` bool: the ``budget x heads`` best tokens of each sequence.

        Protected tokens first, then each head's guaranteed share (``floor`` of its
        unprotected budget), then the best scores of the layer regardless of head. The scores
        are those of the layer's (outermost) policy.
        """
        scores = layer.policy.score(layer).float()
        batch, heads, slots = scores.shape
        protected = layer.protected_mask() & layer.valid
        ranked = scores.masked_fill(protected | ~layer.valid, float("-inf"))
        share = int(self.floor * max(budget - layer.policy.protected, 0))
        order = ranked.sort(dim=-1, descending=True, stable=True).indices
        guaranteed = torch.zeros_like(protected).scatter(-1, order[..., :share], True) & layer.valid
        priority = scores.masked_fill(protected | guaranteed, float("inf")).masked_fill(~layer.valid, float("-inf"))
        flat = priority.reshape(batch, heads * slots)
        chosen = flat.sort(dim=-1, descending=True, stable=True).indices[:, : budget * heads]
        keep = torch.zeros_like(flat, dtype=torch.bool).scatter(-1, chosen, True)
        return keep.view(batch, heads, slots) & layer.valid
