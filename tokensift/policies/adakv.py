"""Ada-KV: one budget per layer, split across its KV heads by score."""

from dataclasses import dataclass

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
    (:class:`~tokensift.storage.varlen.VarlenLayer`). Scores must be comparable across heads
    (attention mass is; snapkv, h2o, tova, caote, graphkv all qualify).
    """

    name = "adakv"
    paper = "Feng et al. 2024, Ada-KV: Optimizing KV Cache Eviction by Adaptive Budget Allocation (arXiv:2407.11550)"
    inner: Policy | str | None = "snapkv"  # the wrapped policy (a name or an expression)
    own_layer_class = "tokensift.storage.varlen:VarlenLayer"
    floor: float = 0.2

    def validate(self) -> None:
        super().validate()
        if not 0.0 <= self.floor <= 1.0:
            raise TokensiftError(f"adakv: floor must be in [0, 1] (got {self.floor})")
