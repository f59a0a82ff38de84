"""H2O: heavy hitters by accumulated attention, plus the recent window."""

from dataclasses import dataclass

import torch

from tokensift.policies.base import Policy
from tokensift.policies.registry import register
from tokensift.scoring import pad_to


@register
@dataclass
class H2O(Policy):
    """Score = attention each token has received from every query so far (summed).

    Zhang et al., "H2O: Heavy-Hitter Oracle for Efficient Generative Inference of Large
    Language Models", NeurIPS 2023 (arXiv:2306.14048).

    Parameters
    ----------
    Only the common parameters of :class:`~tokensift.policies.base.Policy`.
    """

    name = "h2o"
    paper = "Zhang et al. 2023, H2O: Heavy-Hitter Oracle (arXiv:2306.14048)"
    needs_attention = True

    def observe(self, layer, view) -> None:
        running = pad_to(layer.token_state.get("h2o"), layer.kept, layer.keys)
        layer.token_state["h2o"] = running + view.column_sum()

    def score(self, layer) -> torch.Tensor:
        return layer.token_state["h2o"]
