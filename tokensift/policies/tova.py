"""TOVA: keep the tokens the current query attends to most."""

from dataclasses import dataclass

import torch

from tokensift.policies.base import Policy
from tokensift.policies.registry import register


@register
@dataclass
class TOVA(Policy):
    """Score = attention of the last query only (per KV head, averaged over its query heads).

    Oren et al., "Transformers are Multi-State RNNs" (TOVA), arXiv:2401.06104.

    Parameters
    ----------
    Only the common parameters of :class:`~tokensift.policies.base.Policy`.
    """

    name = "tova"
    paper = "Oren et al. 2024, Transformers are Multi-State RNNs (arXiv:2401.06104)"
    needs_attention = True

    def observe(self, layer, view) -> None:
        layer.token_state["tova"] = view.probs(view.last_rows(1))[:, :, -1]

    def score(self, layer) -> torch.Tensor:
        return layer.token_state["tova"]
