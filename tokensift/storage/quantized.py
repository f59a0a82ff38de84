"""Mixed-precision storage (ZipCache): salient tokens at high bits, the rest at low bits.

Layout per layer, in slot order:

- quantized *blocks*, each covering a slot range ``[start, start + n)`` and stored per batch
  row (rows hold different numbers of real tokens under left padding). Within a row's block,
  slots are reordered so that the ``n_hi`` salient tokens come first, then the ``n_lo`` others,
  then padding (nothing is stored for padding). Per row and KV head: channel scales for K and
  V (fp16 ``[heads, 1, dim]``) and, for each precision, packed codes + fp16 per-token
  scale/zero-point (:class:`tokensift.quant.QuantTensor`);
- a full-precision *tail*: the most recent tokens. The last ``window`` tokens always stay in
  full precision; when at least ``group`` older tail tokens have accumulated they are
  quantized as a new block (the whole out-of-window tail at once after prefill).

``kv_bytes`` is exactly: tail K/V bytes + every block's packed codes, token scales/zero-points
and channel scales. An eviction (when the policy has a budget) dequantizes, drops tokens and
re-quantizes everything out of the window as one block, with saliency re-ranked among the kept
tokens (a second rounding: use ``interval`` to evict in batches).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from tokensift.quant import (
    QuantTensor,
    channel_scale,
    dequantize_channel_separable,
    quantize_channel_separable,
)
from tokensift.storage.compact import CompactLayer


@dataclass
class RowBlock:
    """One batch row's part of a quantized block (all KV heads)."""

    n_hi: int
    n_lo: int
    key_scale: torch.Tensor  # fp16 [heads, 1, dim]
    value_scale: torch.Tensor
    parts: list[tuple[QuantTensor, QuantTensor]]  # (keys, values) at high bits, then at low bits (empty ones left out)

    @property
    def nbytes(self) -> int:
        return self.key_scale.nbytes + self.value_scale.nbytes + sum(k.nbytes + v.nbytes for k, v in self.parts)


@dataclass
class Block:
    start: int
    size: int
    rows: list[RowBlock]

    @property
    def nbytes(self) -> int:
        return sum(row.nbytes for row in self.rows)


class QuantizedLayer(CompactLayer):
    """Selecting layer holding old tokens as packed mixed-precision integers."""

    def __init__(self, layer_idx: int, num_layers: int, policy):
        super().__init__(layer_idx, num_layers, policy)
        self.blocks: list[Block] = []
        self.tail_keys: torch.Tensor | None = None
        self.tail_values: torch.Tensor | None = None
        self.requantize = False  # set when slots moved: quantize everything out of the window
        self.config = _quantizing_policy(policy)  # the policy with the bit widths (may be wrapped)

    def reset(self) -> None:
        super().reset()
        self.blocks, self.tail_keys, self.tail_values, self.requantize = [], None, None, False

    def _drop_blocks(self) -> None:
        self.blocks, self.requantize = [], True

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.expand()
        self._drop_blocks()
        super().batch_select_indices(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        self.expand()
        self._drop_blocks()
        super().batch_repeat_interleave(repeats)

    @property
    def quantized_slots(self) -> int:
        return sum(block.size for block in self.blocks)

    # ----------------------------------------------------------------- storage
    def _gather_tokens(self, index) -> None:
        if not isinstance(index, slice):
            self._drop_blocks()  # slots moved (eviction, rollback): re-quantize out of the window
        super()._gather_tokens(index)

    def _pack(self) -> None:
        start = self.quantized_slots
        recent = min(self.policy.window, self.seen)
        count = self.kept - start - recent
        if count > 0 and (count >= self.config.group or self.requantize):
            self.blocks.append(self._quantize_block(start, count))
        self.requantize = False
        tail = self.quantized_slots
        # a copy, never a view: a view (an empty or contiguous tail, an append buffer) keeps more alive
        self.tail_keys = self.keys[:, :, tail:].clone()
        self.tail_values = self.values[:, :, tail:].clone()
        self.keys = self.values = None
        self.packed = True

    def _unpack(self) -> tuple[torch.Tensor, torch.Tensor]:
        batch, heads, dim = self.shape
        keys = self.tail_keys.new_zeros(batch, heads, self.kept, dim)
        values = self.tail_values.new_zeros(batch, heads, self.kept, dim)
        for block in self.blocks:
            for row, part in enumerate(block.rows):
                k, v = dequantize_row(part)
                keys[row, :, block.start:block.start + k.shape[1]] = k.to(keys.dtype)
                values[row, :, block.start:block.start + v.shape[1]] = v.to(values.dtype)
        tail = self.quantized_slots
        keys[:, :, tail:] = self.tail_keys
        values[:, :, tail:] = self.tail_values
        self.tail_keys = self.tail_values = None
        return keys, values

    def packed_bytes(self) -> int:
        return self.tail_keys.nbytes + self.tail_values.nbytes + sum(block.nbytes for block in self.blocks)

    @property
    def kv_bytes_16bit(self) -> int:
        """Packed blocks as they are; the full-precision tail at 2 bytes an element."""
        if not self.packed:
            return super().kv_bytes_16bit
        tail = self.tail_keys.nbytes + self.tail_values.nbytes
        return self.packed_bytes() - tail + tail * 2 // self.itemsize

    # ------------------------------------------------------------ quantization
    def _quantize_block(self, start: int, count: int) -> Block:
        """Quantize slots ``[start, start + count)``: reorder (salient first), then pack per row."""
        span = slice(start, start + count)
        salient, real = self._salient_split(span)
        self._reorder_span(start, count, salient)
        rows = []
        for row in range(self.keys.shape[0]):
            n_real = int(real[row])
            n_hi = int(salient[row].sum(-1).max())
            keys = self.keys[row, :, start:start + n_real]
            values = self.values[row, :, start:start + n_real]
            rows.append(quantize_row(keys, values, n_hi, self.config.hi_bits, self.config.lo_bits))
        return Block(start, count, rows)

    def _salient_split(self, span: slice) -> tuple[torch.Tensor, torch.Tensor]:
        """``[batch, heads, count]`` salient flags and ``[batch]`` real-token counts of a span."""
        valid = self.valid[:, :, span]
        real = valid.sum(-1).amax(-1)  # per row (heads agree unless eviction left a row short)
        saliency = self.config.saliency(self)[:, :, span].masked_fill(~valid, float("-inf"))
        n_hi = torch.tensor([math.ceil(self.config.salient_ratio * int(r)) for r in real], device=valid.device)
        order = saliency.sort(dim=-1, descending=True, stable=True).indices
        ranks = torch.empty_like(order).scatter_(-1, order, torch.arange(order.shape[-1], device=order.device).expand_as(order))
        return (ranks < n_hi[:, None, None]) & valid, real

    def _reorder_span(self, start: int, count: int, salient: torch.Tensor) -> None:
        """Within the span, per row and head: salient real tokens, other real tokens, padding."""
        valid = self.valid[:, :, start:start + count]
        key = torch.where(salient, 0, torch.where(valid, 1, 2)).to(torch.int8)
        inside = start + key.sort(dim=-1, stable=True).indices
        batch, heads = valid.shape[:2]
        before = torch.arange(start, device=inside.device).expand(batch, heads, -1)
        after = torch.arange(start + count, self.kept, device=inside.device).expand(batch, heads, -1)
        blocks = self.blocks
        super()._gather_tokens(torch.cat([before, inside, after], dim=-1))  # keeps earlier blocks
        self.blocks = blocks


def _quantizing_policy(policy):
    """The policy (possibly inside wrappers) that carries the quantization settings."""
    while not hasattr(policy, "hi_bits") and policy.inner is not None:
        policy = policy.inner
    return policy


def quantize_row(keys: torch.Tensor, values: torch.Tensor, n_hi: int, hi_bits: int, lo_bits: int) -> RowBlock:
    """``[heads, n, dim]`` K/V of one row: the first ``n_hi`` tokens at ``hi_bits``, the rest at ``lo_bits``."""
    key_scale, value_scale = channel_scale(keys), channel_scale(values)
    parts = []
    for part, bits in ((slice(0, n_hi), hi_bits), (slice(n_hi, keys.shape[1]), lo_bits)):
        if keys[:, part].shape[1]:
            parts.append((quantize_channel_separable(keys[:, part], bits, key_scale),
                          quantize_channel_separable(values[:, part], bits, value_scale)))
    n = keys.shape[1]
    return RowBlock(n_hi=min(n_hi, n), n_lo=n - min(n_hi, n), key_scale=key_scale, value_scale=value_scale, parts=parts)


def dequantize_row(row: RowBlock) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 ``[heads, n_hi + n_lo, dim]`` K/V of a row block."""
    keys = [dequantize_channel_separable(k, row.key_scale) for k, _ in row.parts]
    values = [dequantize_channel_separable(v, row.value_scale) for _, v in row.parts]
    if not keys:
        empty = row.key_scale.new_zeros(row.key_scale.shape[0], 0, row.key_scale.shape[-1]).float()
        return empty, empty
    return torch.cat(keys, dim=1), torch.cat(values, dim=1)
