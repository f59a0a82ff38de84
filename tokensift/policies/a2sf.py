"""A2SF: accumulated attention with a forgetting factor."""

from dataclasses import dataclass

import torch

from tokensift.policies.base import Policy
from tokensift.policies.registry import register
from tokensift.scoring import pad_to


@register
@dataclass
class A2SF(Policy):
    """Score <- factor * score + attention_now, so old queries count less.

    Jo & Shin, "A2SF: Accumulative Attention Scoring with Forgetting Factor for Token Pruning
    in Transformer Decoder" (arXiv:2407.20485). Plain accumulation (H2O) favours early tokens,
    which more queries can see under the causal mask; the forgetting factor removes that bias.
    In a block of ``n`` new queries, row ``i`` is weighted ``factor ** (n - 1 - i)``.

    Parameters
    ----------
    factor : float, default 0.99
        Decay applied to the running score per new query (1.0: plain accumulation, as H2O).

    Plus the common parameters of :class:`~tokensift.policies.base.Policy`.
    """

    name = "a2sf"
    paper = "Jo & Shin 2024, A2SF: Accumulative Attention Scoring with Forgetting Factor (arXiv:2407.20485)"
    needs_attention = True
    factor: float = 0.99

    def observe(self, layer, view) -> None:
        n = view.num_queries
        weights = self.factor ** torch.arange(n - 1, -1, -1, dtype=torch.float64, device=view.query.device)
        running = pad_to(layer.token_state.get("a2sf"), layer.kept, layer.keys) * (self.factor**n)
        layer.token_state["a2sf"] = running + view.column_sum(row_weights=weights.float())

    def score(self, layer) -> torch.Tensor:
        return layer.token_state["a2sf"]
