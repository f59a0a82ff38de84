"""StreamingLLM: attention sinks plus a sliding window of recent tokens."""

from dataclasses import dataclass

import torch

from tokensift.policies.base import Policy
from tokensift.policies.registry import register


@register
@dataclass
class StreamingLLM(Policy):
    """Keep the first ``n_sink`` tokens and the most recent ones, nothing else.

    Xiao et al., "Efficient Streaming Language Models with Attention Sinks", ICLR 2024
    (arXiv:2309.17453). The whole budget beyond the sinks goes to the most recent tokens.

    Parameters
    ----------
    Only the common parameters of :class:`~tokensift.policies.base.Policy`.
    """

    name = "streaming_llm"
    paper = "Xiao et al. 2024, Efficient Streaming Language Models with Attention Sinks (arXiv:2309.17453)"

    def score(self, layer) -> torch.Tensor:
        return layer.positions.float()
