"""TokenSelect: per-head q·k criticality, soft voting, and a selection cache."""

from dataclasses import dataclass

import torch

from tokensift.errors import TokensiftError
from tokensift.policies.registry import register
from tokensift.policies.sparse_base import SparsePolicy
from tokensift.selection import (
    count, cosine, forced_mask, gather_attend, group_reduce, head_logits, layer_wide, reuse_read, save_selection,
    to_query_heads, top_k,
)


@register
@dataclass
class TokenSelect(SparsePolicy):
    """Per query head, softmax of q·k over the cache; soft vote (sum) over the query heads of each
    KV group (``vote="group"``) or over all heads (``vote="all"``, one set per layer); top-``k``
    with sinks and the recent window; attention over those only.

    *Selection cache*: when the cosine similarity between this step's query and the query of
    the last fresh selection (mean over heads) is at least ``threshold`` for every sequence of
    the batch, the last selection is reused (plus the tokens added since); otherwise a fresh
    selection is made and becomes the reference. ``threshold > 1`` disables reuse.

    Wu et al., "TokenSelect: Efficient Long-Context Inference and Length Extrapolation for LLMs
    via Dynamic Token-Level KV Cache Selection" (arXiv:2411.02886).

    Parameters
    ----------
    k : int
        Tokens read per KV head at a fresh selection (see :class:`SparsePolicy`; ``base=`` /
        an inner policy compose it with an evicting or storage policy).
    threshold : float, default 0.9
        Query cosine similarity from which the last selection is reused (> 1: never).
    vote : str, default "group"
        ``group``: one selection per KV head (its query heads vote); ``all``: one per layer.

    Plus the parameters of :class:`~tokensift.policies.sparse_base.SparsePolicy` (``k``, the base policy).
    """

    name = "tokenselect"
    paper = "Wu et al. 2024, TokenSelect: Dynamic Token-Level KV Cache Selection (arXiv:2411.02886)"
    threshold: float = 0.9
    vote: str = "group"

    def validate_method(self) -> None:
        if self.vote not in ("group", "all"):
            raise TokensiftError(f"tokenselect: vote must be 'group' or 'all' (got '{self.vote}')")

    def read(self, layer, query, key, value, query_valid, scaling):
        saved = layer.state.get("tokenselect")
        q_now = query[:, :, 0]
        if saved is not None and saved["query"].shape == q_now.shape:
            if bool((cosine(q_now, saved["query"]) >= self.threshold).all()):
                count(layer, "reused")
                return reuse_read(layer, query, key, value, query_valid, scaling, saved)
        count(layer, "fresh")
        index, ok = self.select(layer, query, key, scaling)
        layer.state["tokenselect"] = {**save_selection(layer, index, ok), "query": q_now.clone()}
        return gather_attend(query, key, value, index, ok, scaling, query_valid)

    def select(self, layer, query, key, scaling):
        """Fresh selection: storage indices ``[batch, kv_heads, k]`` and their ``ok`` mask."""
        q_heads, kv_heads = query.shape[1], key.shape[1]
        logits = head_logits(query, key, scaling).float()
        logits = logits.masked_fill(~to_query_heads(layer.valid, q_heads), float("-inf"))
        votes = group_reduce(torch.softmax(logits, dim=-1).nan_to_num_(0.0), kv_heads)
        forced, allowed = forced_mask(layer), layer.valid
        if self.vote == "all":
            total, _, _ = layer_wide(layer, votes, forced, allowed)
            votes = total.gather(1, layer.positions.reshape(total.shape[0], -1)).view_as(votes)
        return top_k(votes, self.k, forced, allowed)
