"""Banded attention for sliding-window layers during long prefills: O(n·window), not O(n²).

A sliding-window layer (Gemma 3: 512 tokens on 15 of 18 layers) lets query ``i`` see keys
``i - window < j <= i`` only. Transformers' SDPA path still multiplies every query by every key
and masks the n×n product, so a 32k prefill pays for 32k×32k scores on each such layer. Here
the queries go in blocks of ``chunk``; a block reads only the keys its band can reach (``window``
before its first query up to its last), with the matching slice of the very same 4D mask, so
every row sees exactly the keys it saw before (padding included). Softmax over the band equals
softmax over the full masked row: results differ from the stock path by float rounding only
(tested on a tiny Gemma 3).
"""

from __future__ import annotations

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

CHUNK = 1024  # queries per block (at least the window); blocks read chunk + window keys
ENABLED = [True]  # switch for measurements (``tokensift.banded.ENABLED[0] = False``: stock path)


def wants_banded(query: torch.Tensor, key: torch.Tensor, attention_mask, sliding_window, chunk: int | None = None) -> bool:
    """Whether a call is a long multi-token forward on a sliding-window layer with a full 4D mask."""
    if not ENABLED[0] or not sliding_window or not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 4:
        return False
    q_len, kv_len = query.shape[2], key.shape[2]
    block = block_size(sliding_window, chunk)
    return attention_mask.shape[-1] == kv_len and attention_mask.shape[-2] == q_len and q_len > block + sliding_window


def block_size(sliding_window: int, chunk: int | None = None) -> int:
    return max(chunk or CHUNK, sliding_window)


def banded_attention(module, query, key, value, attention_mask, sliding_window: int, scaling=None, dropout=0.0,
                     chunk: int | None = None, **kwargs) -> torch.Tensor:
    """SDPA of ``query`` over ``key``/``value`` block by block along the band; ``[batch, q, heads, dim]``.

    ``attention_mask`` is the layer's 4D mask ``[batch|1, 1, q, kv]`` (bool or additive); the new
    queries are the last ``q`` of the ``kv`` keys.
    """
    q_len, kv_len = query.shape[2], key.shape[2]
    past = kv_len - q_len
    block = block_size(sliding_window, chunk)
    kwargs.pop("is_causal", None)
    outputs = []
    for start in range(0, q_len, block):
        end = min(start + block, q_len)
        low = max(0, past + start - sliding_window)  # one key more than the band needs; the mask decides
        high = past + end
        out, _ = sdpa_attention_forward(
            module, query[:, :, start:end], key[:, :, low:high], value[:, :, low:high],
            attention_mask[:, :, start:end, low:high], dropout=dropout, scaling=scaling, **kwargs,
        )
        outputs.append(out)
    return torch.cat(outputs, dim=1)
