"""The ``tokensift`` attention function, registered through transformers' AttentionInterface.

The layer is found from the call itself: the selecting cache the attention module was given
(recorded on the module by the hook :func:`tokensift.hooks.install_cache_hooks`) at the module's
``layer_idx``; no cache, or a layer of transformers' own (sliding window), takes the stock path.
While a layer holds exactly what a plain cache would, it defers to transformers' own SDPA
function (so the ``full`` policy is bit-identical to plain ``generate``). Otherwise the layer
attends itself (``SelectingLayer.attend``: a mask from its own per-token validity and true
positions; storage variants override it). After attention, it lets the policy observe (attention statistics computed only
when the policy needs them, chunked, never a full matrix) and enforces the budget.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from tokensift.banded import banded_attention, wants_banded
from tokensift.cache import SelectingLayer
from tokensift.hooks import selecting_layer
from tokensift.scoring import AttentionView

NAME = "tokensift"
PREFILL_WATCH: list = [None]  # a pruning prefill's score watch (tokensift.prefill.subset.ScoreWatch), while it runs


def new_token_validity(attention_mask: torch.Tensor | None, batch: int, q_len: int, device) -> torch.Tensor:
    """``[batch, q]`` bool: False for padding among the new tokens (read off the mask's diagonal)."""
    if attention_mask is None or attention_mask.dim() != 4:
        return torch.ones(batch, q_len, dtype=torch.bool, device=device)
    new_block = attention_mask[:, 0, :, -q_len:]
    if new_block.dtype != torch.bool:
        new_block = new_block == 0
    return new_block.diagonal(dim1=-2, dim2=-1).expand(batch, q_len)


def new_token_block(attention_mask: torch.Tensor | None, q_len: int) -> torch.Tensor | None:
    """The new-token part ``[batch|1, 1, q, q]`` (bool) of a 4D mask, or None (causal)."""
    if attention_mask is None or attention_mask.dim() != 4:
        return None
    block = attention_mask[..., -q_len:]
    return block if block.dtype == torch.bool else block == 0


def attention_view(layer: SelectingLayer, query: torch.Tensor, query_valid: torch.Tensor, scaling: float) -> AttentionView:
    """Everything a scorer needs about this attention call."""
    q_len = query.shape[2]
    subset = layer.subset_positions  # a pruning prefill's block: its queries sit at these true positions
    query_positions = subset if subset is not None else torch.arange(layer.seen - q_len, layer.seen, device=query.device)
    return AttentionView(
        query=query,
        keys=layer.keys,
        key_valid=layer.valid,
        key_positions=layer.positions,
        query_positions=query_positions,
        query_valid=query_valid,
        scaling=scaling,
    )


def tokensift_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Attention for the selecting cache (see module docstring)."""
    if PREFILL_WATCH[0] is not None:
        PREFILL_WATCH[0](module, query, key, scaling)
    layer = selecting_layer(module)  # cache.layers[module.layer_idx] of the selecting cache this call was given
    if layer is None:
        window = kwargs.pop("sliding_window", None)
        if wants_banded(query, key, attention_mask, window):  # long prefill on a sliding layer: O(n·window)
            return banded_attention(module, query, key, value, attention_mask, window, scaling, dropout, **kwargs), None
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
    batch, _, q_len, _ = query.shape
    query_valid = new_token_validity(attention_mask, batch, q_len, query.device)

    def attend() -> torch.Tensor:
        if layer.is_plain:
            return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                          **kwargs)[0]
        return layer.attend(query, key, value, query_valid, scaling, new_token_block(attention_mask, q_len))

    return attention_step(layer, query, query_valid, scaling, attend), None


def attention_step(layer: SelectingLayer, query: torch.Tensor, query_valid: torch.Tensor, scaling: float,
                   attend=None, view_of=None) -> torch.Tensor | None:
    """One attention call on a selecting layer whose new K/V ``update`` has appended: mark the new
    tokens (padding, sinks), ``attend()`` (when an output is wanted; the replay wants none), let
    the policy observe (statistics only if it needs them), then enforce the budget.

    ``view_of()`` (optional) gives the call's AttentionView, so several caches of the same
    prompt can share its statistics (the replay).
    """
    layer.mark_new_tokens(query_valid)
    output = attend() if attend is not None else None
    record_queries(layer, query, scaling)
    policy = layer.policy
    view = None
    if policy.needs_attention:
        view = view_of() if view_of is not None else attention_view(layer, query, query_valid, scaling)
    policy.observe(layer, view)
    layer.enforce_budget()
    return output


def record_queries(layer: SelectingLayer, query: torch.Tensor, scaling: float) -> None:
    """Keep this layer's queries when the cache asks for it (the benchmark replays prefills)."""
    recording = layer.shared.get("record_queries")
    if recording is not None:
        recording[layer.layer_idx] = (query, scaling)


def register() -> None:
    """Register the attention function and its mask function under the name ``tokensift``."""
    AttentionInterface.register(NAME, tokensift_attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)


def use_tokensift_attention(model) -> None:
    """Switch ``model`` to the tokensift attention function (stock SDPA for plain layers)."""
    register()
    if getattr(model.config, "_attn_implementation", None) != NAME:
        model.set_attn_implementation(NAME)


register()
