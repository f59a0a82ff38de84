"""ToDRE stage 1: greedy k-center on visual token features (diversity, not importance)."""

from __future__ import annotations

from dataclasses import dataclass

from .base import Selection, SelectorBase, cosine_matrix, greedy_farthest, importance
from .registry import register


@register
@dataclass
class ToDRE(SelectorBase):
    """Greedy k-center (farthest-point) selection seeded by the most important token.

    "ToDRE: Visual Token Pruning via Diversity and Task Awareness for Efficient Large
    Vision-Language Models". Stage 1 (this selector) runs after the vision encoder; stage 2
    (task relevance inside the LLM) is ``VisualTokenPruner(stage2_layer=..., stage2_keep=...)``.

    Parameters
    ----------
    None.
    """

    name = "todre"
    uses_attention = True

    def select(self, tokens, budget, scores=None, layer_scores=None, text=None) -> Selection:
        first = importance(tokens, scores, layer_scores).argmax(dim=-1)
        return Selection(greedy_farthest(1.0 - cosine_matrix(tokens), first, budget))
