"""FasterVLM: keep the patches the [CLS] token attends to most."""

from __future__ import annotations

from dataclasses import dataclass

from .base import Selection, SelectorBase, importance, topk_sorted
from .registry import register


@register
@dataclass
class FasterVLM(SelectorBase):
    """[CLS] attention of the encoder's last layer (averaged over heads); keep the top-k.

    "[CLS] Attention is All You Need for Training-Free Visual Token Pruning: Make
    VLM Inference Faster" (FasterVLM). Without [CLS] scores, falls back to ``proxy_scores``.

    Parameters
    ----------
    None.
    """

    name = "fastervlm"
    uses_attention = True

    def select(self, tokens, budget, scores=None, layer_scores=None, text=None) -> Selection:
        return Selection(topk_sorted(importance(tokens, scores, layer_scores), budget))
