"""Recycled Attention: full attention every ``stride`` steps, its top-k in between."""

from dataclasses import dataclass

from tokensift.errors import TokensiftError
from tokensift.policies.registry import register
from tokensift.policies.sparse_base import SparsePolicy
from tokensift.selection import (
    count, cosine, dense_with_probs, forced_mask, group_reduce, reuse_read, save_selection, top_k,
)


@register
@dataclass
class RecycledAttention(SparsePolicy):
    """Every ``stride`` decode steps (and at the first), a full-attention step records, per KV head,
    the ``k`` most attended tokens (probabilities summed over the query group, sinks and window
    forced in). The steps in between attend only to those plus the tokens generated since.
    With ``refresh_below`` set, a step whose query's cosine similarity to the last full step's
    query (mean over heads) drops below it triggers a full step early.

    Xu et al., "Recycled Attention: Efficient inference for long-context language models"
    (arXiv:2411.05787).

    Parameters
    ----------
    stride : int, default 16
        Decode steps between two full-attention steps (1: every step is full).
    refresh_below : float or None, default None
        Query cosine similarity below which a full step comes early (None: only every ``stride``).

    Plus the parameters of :class:`~tokensift.policies.sparse_base.SparsePolicy` (``k``, the base policy).
    """

    name = "recycled_attention"
    paper = "Xu et al. 2024, Recycled Attention: Efficient inference for long-context language models (arXiv:2411.05787)"
    stride: int = 16
    refresh_below: float | None = None

    def validate_method(self) -> None:
        if self.stride < 1:
            raise TokensiftError(f"recycled_attention: stride must be >= 1 (got {self.stride})")

    def read(self, layer, query, key, value, query_valid, scaling):
        saved = layer.state.get("recycled")
        q_now = query[:, :, 0]
        step = layer.state.get("recycled_step", 0)
        layer.state["recycled_step"] = step + 1
        reuse = saved is not None and saved["query"].shape == q_now.shape and step % self.stride != 0
        if reuse and self.refresh_below is not None:
            reuse = bool((cosine(q_now, saved["query"]) >= self.refresh_below).all())
        if reuse:
            count(layer, "reused")
            return reuse_read(layer, query, key, value, query_valid, scaling, saved)
        count(layer, "fresh")
        layer.state["recycled_step"] = 1
        output, probs = dense_with_probs(layer, query, key, value, scaling)
        index, ok = top_k(group_reduce(probs, key.shape[1]), self.k, forced_mask(layer), layer.valid)
        layer.state["recycled"] = {**save_selection(layer, index, ok), "query": q_now.clone()}
        return output
