"""Prune or merge tokens inside a ViT during the forward pass, so later layers run on fewer.

Works with ``transformers`` ``Dinov2Model``, ``ViTModel``, ``CLIPVisionModel`` and any model
with the same layout (``embeddings``, a list of encoder layers, an optional final norm). The
model's attention is routed, for the duration of a run, through an attention function
registered with ``AttentionInterface`` that adds ``log(size)`` to the logits of merged tokens
(ToMe's proportional attention) and records the [CLS] attention row and the keys a method needs.
Without merged tokens it is exactly ``transformers``' SDPA attention.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from torch import nn

from tokensift.errors import TokensiftError

from .selectors import Selection, SelectorBase, get_selector, resolve_budget
from .selectors.tome import MergeState, merge_to

ATTN_NAME = "tokensift_vision"


@dataclass
class _Recorder:
    """What the registered attention function reads and writes during a run."""

    record: bool = False
    log_sizes: torch.Tensor | None = None
    cls_rows: list = field(default_factory=list)
    keys: torch.Tensor | None = None


_REC = _Recorder()


def _vision_attention(module, query, key, value, attention_mask, **kwargs):
    """SDPA plus proportional attention (``log(size)`` bias) and [CLS]-row/keys recording."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    bias = None if _REC.log_sizes is None else _REC.log_sizes[:, None, None, :].to(query.dtype)
    if _REC.record:
        scale = kwargs.get("scaling") or query.shape[-1] ** -0.5
        logits = (query[:, :, :1].float() @ key.float().transpose(-1, -2)) * scale
        if bias is not None:
            logits = logits + bias.float()
        _REC.cls_rows.append(torch.softmax(logits, dim=-1).mean(dim=1)[:, 0])
        _REC.keys = key.mean(dim=1)
    if bias is not None:
        kwargs["position_bias"] = bias
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def _register_attention() -> None:
    """Register the attention (and its mask) function under ``ATTN_NAME``, once."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTN_NAME, _vision_attention)
    AttentionMaskInterface.register(ATTN_NAME, sdpa_mask)


@contextlib.contextmanager
def _routed(model: nn.Module):
    """Temporarily route the model's attention through ``_vision_attention``."""
    _register_attention()
    previous = model.config._attn_implementation
    model.set_attn_implementation(ATTN_NAME)
    try:
        yield
    finally:
        model.set_attn_implementation(previous)
        _REC.record, _REC.log_sizes, _REC.cls_rows, _REC.keys = False, None, [], None


@dataclass
class VitParts:
    """The pieces of a ViT the runner needs."""

    embeddings: nn.Module
    pre_norm: nn.Module
    layers: nn.ModuleList
    seq_norm: nn.Module | None
    cls_norm: nn.Module | None
    n_protected: int


def vit_parts(model: nn.Module) -> VitParts:
    """Find embeddings, encoder layers and norms of a Dinov2/ViT/CLIP-vision-like model."""
    base = getattr(model, "vision_model", model)
    encoder = getattr(base, "encoder", base)
    layers = getattr(encoder, "layer", None) or getattr(encoder, "layers", None) or getattr(base, "layers", None)
    if not hasattr(base, "embeddings") or not isinstance(layers, nn.ModuleList):
        raise TokensiftError(
            f"{type(model).__name__} is not a supported vision transformer; use a Dinov2Model, ViTModel, "
            "CLIPVisionModel or a model with embeddings + encoder layers"
        )
    seq_norm = getattr(base, "layernorm", None)
    cls_norm = getattr(base, "post_layernorm", None) if seq_norm is None else None
    registers = getattr(model.config, "num_register_tokens", 0) or 0
    return VitParts(base.embeddings, getattr(base, "pre_layrnorm", nn.Identity()), layers,
                    seq_norm, cls_norm, 1 + registers)


@dataclass
class VitRun:
    """Outputs of a (pruned) ViT forward."""

    last_hidden_state: torch.Tensor
    cls: torch.Tensor
    pooled: torch.Tensor
    indices: torch.Tensor | None
    sizes: torch.Tensor
    tokens_in: int
    tokens_per_layer: list[int]


def run_vit(model: nn.Module, pixel_values: torch.Tensor, method: str | SelectorBase | None = None,
            budget: int | None = None, ratio: float | None = None, layer: int | None = None,
            **params) -> VitRun:
    """Forward ``model`` on ``pixel_values``, applying ``method`` after encoder layer ``layer``.

    ``layer`` counts encoder layers already run (0 = right after the embeddings; default: after
    the last layer). For ``tome``, merging is spread over layers 1..``layer`` so that the budget
    is reached after layer ``layer``. ``method=None`` runs the plain model.
    """
    parts = vit_parts(model)
    n_layers = len(parts.layers)
    layer = n_layers if layer is None else layer
    if not 0 <= layer <= n_layers:
        raise TokensiftError(f"layer {layer} is out of range: this ViT has layers 0..{n_layers}")
    selector = get_selector(method, **params) if isinstance(method, str) else method
    with torch.no_grad(), _routed(model):
        return _forward(parts, pixel_values, selector, budget, ratio, layer)


def _forward(parts: VitParts, pixel_values, selector, budget, ratio, layer) -> VitRun:
    """The layer loop of ``run_vit``."""
    p = parts.n_protected
    h = parts.pre_norm(parts.embeddings(pixel_values))
    B, n_in = h.shape[0], h.shape[1] - p
    k = n_in if selector is None else resolve_budget(n_in, budget, ratio)
    tome = selector is not None and selector.name == "tome"
    index = torch.arange(n_in, device=h.device).expand(B, n_in)
    sizes = torch.ones(B, n_in, device=h.device)
    counts = [n_in]
    if selector is not None and not tome and layer == 0:
        h, index, sizes = _select(selector, h, p, k, index, sizes, [])
    for i, block in enumerate(parts.layers, start=1):
        _REC.log_sizes = _log_sizes(sizes, p)
        _REC.record = selector is not None and i <= layer and (tome or selector.uses_attention)
        out = block(h, None)
        h = out[0] if isinstance(out, tuple) else out
        if tome and i <= layer:
            h, index, sizes = _tome_step(h, p, _REC.keys, index, sizes, _schedule(n_in, k, layer, i))
        elif selector is not None and i == layer:
            h, index, sizes = _select(selector, h, p, k, index, sizes, _REC.cls_rows)
        counts.append(h.shape[1] - p)
    return _finish(parts, h, p, None if selector is None else index, sizes, n_in, counts)


def _log_sizes(sizes: torch.Tensor, p: int) -> torch.Tensor | None:
    """Proportional-attention bias over [protected + patch] tokens, or None when all sizes are 1."""
    if bool((sizes == 1).all()):
        return None
    ones = torch.ones(sizes.shape[0], p, device=sizes.device)
    return torch.cat([ones, sizes], dim=1).log()


def _schedule(n: int, k: int, layer: int, i: int) -> int:
    """Token count after layer ``i`` when going linearly from ``n`` to ``k`` over ``layer`` layers."""
    return n - round((n - k) * i / layer)


def _tome_step(h, p, keys, index, sizes, target):
    """Merge patch tokens of ``h`` down to ``target`` using the layer's keys as similarity."""
    state = MergeState(h[:, p:], keys[:, p:], sizes, index)
    state = merge_to(state, target)
    return torch.cat([h[:, :p], state.x], dim=1), state.index, state.sizes


def _select(selector, h, p, k, index, sizes, cls_rows):
    """Apply a selector to the patch tokens of ``h`` with [CLS] attention rows as scores."""
    layer_scores = torch.stack([row[:, p:] for row in cls_rows]) if cls_rows else None
    sel: Selection = selector.select(h[:, p:], k, layer_scores=layer_scores)
    kept, new_sizes = sel.gather(h[:, p:])
    if sel.sizes is None:
        new_sizes = torch.gather(sizes, 1, sel.indices)
    return torch.cat([h[:, :p], kept], dim=1), torch.gather(index, 1, sel.indices), new_sizes


def _finish(parts: VitParts, h, p, index, sizes, n_in, counts) -> VitRun:
    """Final norms, [CLS] and size-weighted pooled patch features."""
    last = parts.seq_norm(h) if parts.seq_norm is not None else h
    cls = parts.cls_norm(last[:, 0]) if parts.cls_norm is not None else last[:, 0]
    w = sizes.to(last.dtype).unsqueeze(-1)
    pooled = (last[:, p:] * w).sum(dim=1) / w.sum(dim=1)
    return VitRun(last, cls, pooled, index, sizes, n_in, counts)


@dataclass
class Encoded:
    """Final-layer tokens (before the final norm) and the [CLS] attention row of every layer."""

    hidden: torch.Tensor
    cls_rows: list


def encode(model: nn.Module, pixel_values: torch.Tensor) -> Encoded:
    """Plain forward that keeps what output-side selection needs (one forward for many methods)."""
    parts = vit_parts(model)
    with torch.no_grad(), _routed(model):
        h = parts.pre_norm(parts.embeddings(pixel_values))
        _REC.record = True
        for block in parts.layers:
            out = block(h, None)
            h = out[0] if isinstance(out, tuple) else out
        return Encoded(h, list(_REC.cls_rows))


def select_encoded(model: nn.Module, enc: Encoded, method: str | SelectorBase, budget: int | None = None,
                   ratio: float | None = None, **params) -> VitRun:
    """Apply a selector to the encoder's output tokens: what a VLM would receive.

    Same result as ``run_vit(..., layer=last)`` for selection methods; ``tome`` here is the
    one-shot selector version (merging on the output tokens).
    """
    parts = vit_parts(model)
    selector = get_selector(method, **params) if isinstance(method, str) else method
    p = parts.n_protected
    B, n_in = enc.hidden.shape[0], enc.hidden.shape[1] - p
    k = resolve_budget(n_in, budget, ratio)
    index = torch.arange(n_in, device=enc.hidden.device).expand(B, n_in)
    sizes = torch.ones(B, n_in, device=enc.hidden.device)
    with torch.no_grad():
        h, index, sizes = _select(selector, enc.hidden, p, k, index, sizes, enc.cls_rows)
        return _finish(parts, h, p, index, sizes, n_in, [n_in] * len(parts.layers) + [k])


def finish_encoded(model: nn.Module, enc: Encoded) -> VitRun:
    """The plain model's outputs from ``encode`` (identical to ``run_vit(model, px)``)."""
    parts = vit_parts(model)
    p = parts.n_protected
    B, n_in = enc.hidden.shape[0], enc.hidden.shape[1] - p
    with torch.no_grad():
        return _finish(parts, enc.hidden, p, None, torch.ones(B, n_in, device=enc.hidden.device), n_in, [n_in] * (len(parts.layers) + 1))
