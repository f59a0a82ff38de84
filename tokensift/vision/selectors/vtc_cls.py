"""VTC-CLS: [CLS] attention ensembled over several encoder layers."""

from __future__ import annotations

from dataclasses import dataclass

from .base import Selection, SelectorBase, importance, topk_sorted
from .registry import register


@register
@dataclass
class VTCCLS(SelectorBase):
    """Average the (per-layer normalized) [CLS] attention of the last ``n_layers`` layers; top-k.

    "[CLS] Token Tells Everything Needed for Training-free Efficient MLLMs"
    (VTC-CLS). With only one score row it reduces to FasterVLM.

    Parameters
    ----------
    n_layers : int, default 4
        Last encoder layers whose [CLS] attention is averaged (all given rows if fewer).
    """

    name = "vtc_cls"
    uses_attention = True
    n_layers: int = 4

    def select(self, tokens, budget, scores=None, layer_scores=None, text=None) -> Selection:
        if layer_scores is None:
            return Selection(topk_sorted(importance(tokens, scores, None), budget))
        rows = layer_scores[-self.n_layers:].float()
        rows = rows / rows.sum(dim=-1, keepdim=True).clamp_min(1e-12)
        return Selection(topk_sorted(rows.mean(dim=0), budget))
