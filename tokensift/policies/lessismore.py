"""LessIsMore: one token set per layer from a cross-head vote, plus the recent window."""

from dataclasses import dataclass

import torch

from tokensift.policies.registry import register
from tokensift.policies.sparse_base import CrossLayerPolicy
from tokensift.selection import group_reduce, to_query_heads


@register
@dataclass
class LessIsMore(CrossLayerPolicy):
    """Like TidalDecode's schedule (``full_layers`` dense, selection at layer ``full_layers`` and
    ``reselect_layer``), but the set is a *ranked union across heads*: each query head picks its
    own top-``k`` tokens; a token's rank is the number of heads that picked it (ties broken by
    its summed attention); the best ``k`` (the recent window and sinks always in) form one set
    shared by all heads of the following layers.

    "Less Is More: Training-Free Sparse Attention with Global Locality for Efficient Reasoning".

    Parameters
    ----------
    Only those of :class:`~tokensift.policies.sparse_base.CrossLayerPolicy` (``full_layers``,
    ``reselect_layer``) and :class:`~tokensift.policies.sparse_base.SparsePolicy` (``k``, the
    base policy).
    """

    name = "lessismore"
    paper = "Less Is More: Training-Free Sparse Attention with Global Locality for Efficient Reasoning"
    shared_key = "lessismore"

    def rank(self, layer, query, key, probs, scaling):
        q_heads, kv_heads = probs.shape[1], key.shape[1]
        picks = probs.masked_fill(~to_query_heads(layer.valid, q_heads), -1.0)
        chosen = picks.topk(min(self.k, picks.shape[-1]), dim=-1).indices
        votes = torch.zeros_like(probs).scatter_(2, chosen, 1.0)
        tie_break = probs / (2.0 * q_heads)  # summed over heads it stays below one vote
        return group_reduce(votes + tie_break, kv_heads)
