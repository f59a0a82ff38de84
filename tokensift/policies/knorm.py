"""Key-norm eviction: tokens with a low key norm attract attention, keep those."""

from dataclasses import dataclass

import torch

from tokensift.policies.base import Policy
from tokensift.policies.registry import register


@register
@dataclass
class KNorm(Policy):
    """Score = -||k||: keep low key-norm tokens, no attention needed.

    Devoto et al., "A Simple and Effective L2 Norm-Based Strategy for KV Cache Compression",
    EMNLP 2024 (arXiv:2406.11430).

    Parameters
    ----------
    Only the common parameters of :class:`~tokensift.policies.base.Policy`.
    """

    name = "knorm"
    paper = "Devoto et al. 2024, A Simple and Effective L2 Norm-Based Strategy for KV Cache Compression (arXiv:2406.11430)"

    def score(self, layer) -> torch.Tensor:
        return -layer.keys.float().norm(dim=-1)
