"""A sliding-window layer (Gemma 3's local layers) holding its window as packed low-bit codes.

Each token is quantized once, when it enters the window: per token, in groups of ``group``
channels, asymmetric ``bits``-bit codes (``key_bits`` for the keys, when given) with fp16 scale
and zero-point (the per-token layout
KIVI uses for values; at 4 bits it also serves keys). A step dequantizes the window, appends
the new tokens exactly and attends as transformers' own layer does; the first block (the
prefill) is attended exactly. Once the window is full it is a ring: a decode step's token
replaces the oldest in place, and the dequantize reads the ring oldest first (one compiled call
on a CPU, :mod:`tokensift.storage.sketch_native`). Bytes held: codes + scales + zero-points of
the ``window - 1`` tokens kept.
"""

from __future__ import annotations

import torch

from tokensift.cache import WindowLayer
from tokensift.errors import TokensiftError
from tokensift.quant import EPS, QuantTensor, quantize_tokens
from tokensift.storage import sketch_native


def quantize_grouped(x: torch.Tensor, bits: int, group: int) -> QuantTensor:
    """``[batch, heads, n, dim]`` -> per token and group of ``group`` channels (at most the head dim)."""
    batch, heads, tokens, dim = x.shape
    group = min(group, dim)
    if dim % group:
        raise TokensiftError(f"window_group {group} does not divide the head dim {dim}")
    return quantize_tokens(x.reshape(batch, heads, tokens, dim // group, group), bits)


def dequantize_grouped(q: QuantTensor, dtype: torch.dtype) -> torch.Tensor:
    values = q.dequantize()
    return values.reshape(*values.shape[:3], -1).to(dtype)


def dequantize_ring(q: QuantTensor, start: int, dtype: torch.dtype) -> torch.Tensor:
    """:func:`dequantize_grouped` of a ring whose oldest token is at slot ``start`` (axis 2), oldest
    first: one compiled call on a CPU, else the eager ops on the reordered codes (same numbers)."""
    if q.packed.shape[2] == 0:
        return dequantize_grouped(q, dtype)
    compiled = sketch_native.dequantize_ring(q.packed, q.scale, q.zero, q.bits, start)
    if compiled is not None:
        return compiled.to(dtype)
    return dequantize_grouped(in_order(q, start), dtype)


def in_order(q: QuantTensor, start: int) -> QuantTensor:
    """The ring ``q`` (oldest token at slot ``start``) with its tokens oldest first."""
    if start == 0:
        return q
    return QuantTensor(*(torch.cat([x[:, :, start:], x[:, :, :start]], dim=2) for x in (q.packed, q.scale, q.zero)), q.bits)


def replace_oldest(q: QuantTensor, x: torch.Tensor, slot: int, group: int) -> None:
    """Quantize the one token ``x`` ``[batch, heads, 1, dim]`` into token ``slot`` of the ring ``q``, in
    place: one compiled call on a CPU, else :func:`quantize_grouped` and a copy (same codes)."""
    if sketch_native.quantize_into_ring(x, q.packed, q.scale, q.zero, q.bits, slot, EPS):
        return
    new = quantize_grouped(x, q.bits, group)
    for held, fresh in ((q.packed, new.packed), (q.scale, new.scale), (q.zero, new.zero)):
        held[:, :, slot] = fresh[:, :, 0]


def keep_last(q: QuantTensor, count: int) -> QuantTensor:
    """The last ``count`` tokens (axis 2) of a grouped quantized tensor."""
    start = q.packed.shape[2] - count
    return QuantTensor(q.packed[:, :, start:], q.scale[:, :, start:], q.zero[:, :, start:], q.bits)


def joined(old: QuantTensor | None, new: QuantTensor) -> QuantTensor:
    if old is None:
        return new
    return QuantTensor(*(torch.cat([a, b], dim=2) for a, b in
                         ((old.packed, new.packed), (old.scale, new.scale), (old.zero, new.zero))), new.bits)


class QuantizedWindowLayer(WindowLayer):
    """transformers' sliding-window layer with its kept window stored as ``bits``-bit codes."""

    def __init__(self, sliding_window: int, bits: int = 4, group: int = 64, key_bits: int | None = None, **kwargs):
        super().__init__(sliding_window, **kwargs)
        self.bits, self.group = bits, group
        self.key_bits = key_bits or bits
        self.codes: tuple[QuantTensor, QuantTensor] | None = None
        self.start = 0  # slot of the oldest token: a full window is a ring, one token replaced per step
        self.head_shape: tuple[int, int, int] | None = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if self.record_past:
            raise RuntimeError("a quantized sliding-window layer cannot record past states (no speculative rollback)")
        if self.codes is not None:
            self.keys = dequantize_ring(self.codes[0], self.start, key_states.dtype)
            self.values = dequantize_ring(self.codes[1], self.start, value_states.dtype)
        full_keys, full_values = super().update(key_states, value_states, *args, **kwargs)
        self._store(key_states, value_states)
        return full_keys, full_values

    def _store(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Quantize the new tokens that stay in the window, drop those that left, free the exact copies.
        One token into a full window replaces the oldest in place (no copy of the rest)."""
        kept, new = self.keys.shape[2], key_states.shape[2]
        fresh = min(new, kept)
        if self.replaces_oldest(kept, fresh):
            for held, x in zip(self.codes, (key_states[:, :, -1:], value_states[:, :, -1:])):
                replace_oldest(held, x, self.start, self.group)
            self.start = (self.start + 1) % kept
        else:
            codes = [quantize_grouped(x[:, :, new - fresh:], bits, self.group)
                     for x, bits in ((key_states, self.key_bits), (value_states, self.bits))]
            if self.codes is not None and kept > fresh:
                codes = [joined(keep_last(in_order(old, self.start), kept - fresh), part) for old, part in zip(self.codes, codes)]
            self.codes, self.start = (codes[0], codes[1]), 0
        batch, heads, _, dim = self.keys.shape
        self.head_shape, self.itemsize = (batch, heads, dim), self.keys.element_size()
        self.keys, self.values = self.keys[:, :, :0].clone(), self.values[:, :, :0].clone()

    def replaces_oldest(self, kept: int, fresh: int) -> bool:
        """Whether this step's one token takes the oldest token's slot (a full window, one token)."""
        return self.codes is not None and fresh == 1 and self.held_tokens == kept

    @property
    def held_tokens(self) -> int:
        return 0 if self.codes is None else self.codes[0].packed.shape[2]

    @property
    def kv_bytes(self) -> int:
        return 0 if self.codes is None else self.codes[0].nbytes + self.codes[1].nbytes

    @property
    def kv_bytes_16bit(self) -> int:
        return self.kv_bytes  # codes and fp16 scales: the same in a 16-bit run

    @property
    def kv_bytes_full(self) -> int:
        """What transformers' layer holds for the same tokens, in this run's dtype."""
        if self.head_shape is None:
            return 0
        batch, heads, dim = self.head_shape
        return 2 * batch * heads * self.held_tokens * dim * self.itemsize

    @property
    def element_size(self) -> int:
        return self.itemsize if self.head_shape is not None else 2

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        raise RuntimeError("a quantized sliding-window layer cannot reorder its batch (beam search)")
