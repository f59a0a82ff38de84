"""TidalDecode: position-persistent sparse attention."""

from dataclasses import dataclass

from tokensift.policies.registry import register
from tokensift.policies.sparse_base import CrossLayerPolicy
from tokensift.selection import group_reduce


@register
@dataclass
class TidalDecode(CrossLayerPolicy):
    """The first ``full_layers`` layers attend fully; a token-selection layer (layer
    ``full_layers``) and a re-selection layer (``reselect_layer``, default the middle one)
    attend fully and choose the ``k`` positions with the most attention (probabilities summed
    over all heads; sinks and window forced in); every other layer attends only to the
    positions chosen last in the same step (shared by all heads).

    Yang et al., "TidalDecode: Fast and Accurate LLM Decoding with Position Persistent Sparse
    Attention" (arXiv:2410.05076).

    Parameters
    ----------
    Only those of :class:`~tokensift.policies.sparse_base.CrossLayerPolicy` (``full_layers``,
    ``reselect_layer``) and :class:`~tokensift.policies.sparse_base.SparsePolicy` (``k``, the
    base policy).
    """

    name = "tidaldecode"
    paper = "Yang et al. 2024, TidalDecode: Position Persistent Sparse Attention (arXiv:2410.05076)"
    shared_key = "tidaldecode"

    def rank(self, layer, query, key, probs, scaling):
        return group_reduce(probs, key.shape[1])
