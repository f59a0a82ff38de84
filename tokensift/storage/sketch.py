"""A resident low-bit sketch of every key, used only to choose which exact rows to read.

Keys are rotated by a fixed random Hadamard matrix (QuaRot, Ashkboos et al. 2024,
arXiv:2404.00456: q·k is unchanged when the query is rotated the same way, and the rotation
spreads outlier channels), then quantized per *channel* over groups of ``group`` tokens (KIVI,
Liu et al. 2024, arXiv:2402.02750: each channel of a group gets its own fp16 scale and
zero-point) at ``bits`` bits, packed into uint8. Scores are q·k against the dequantized sketch:
they rank tokens (Quest, ShadowKV: a ranking tolerates coarse keys) and are never attended with.

Each group also keeps the mean of its tokens' values (8-bit codes, one fp16 scale and zero-point
per group): the tiered read's estimate of what the tokens it does not read contribute
(:meth:`tokensift.storage.tiered.TieredLayer.unread_rows`).

Memory per token and KV head: ``dim * bits / 8`` bytes of codes plus ``(5 * dim + 4) / group``
bytes of scales, zero-points and value means (2-bit, dim 64, group 128: 18.5 bytes, against 256
for bf16 K+V).
"""

from __future__ import annotations

import math

import torch

from tokensift.quant import EPS, SCALE_DTYPE, pack_codes, quantize_tokens
from tokensift.storage import sketch_native

_ROTATIONS: dict[tuple, torch.Tensor] = {}
_BYTE_LEVELS: dict[tuple, torch.Tensor] = {}
_SHIFTS: dict[tuple, torch.Tensor] = {}


def hadamard(dim: int, device=None) -> torch.Tensor:
    """The ``dim x dim`` Sylvester Hadamard matrix (``dim`` a power of two), entries +-1, on ``device``."""
    matrix = torch.ones(1, 1, device=device)
    while matrix.shape[0] < dim:
        matrix = torch.cat([torch.cat([matrix, matrix], 1), torch.cat([matrix, -matrix], 1)], 0)
    return matrix


def rotation(dim: int, device, seed: int = 0) -> torch.Tensor:
    """A fixed orthogonal ``[dim, dim]`` fp32 matrix: a random-sign Hadamard (a seeded random
    orthogonal matrix when ``dim`` is not a power of two). Cached per dim and device."""
    key = (dim, str(device), seed)
    if key not in _ROTATIONS:
        generator = torch.Generator().manual_seed(seed)  # drawn on the host: the same matrix on every device
        host = generator.device
        if dim & (dim - 1) == 0:
            signs = torch.randint(0, 2, (dim,), generator=generator, device=host).float() * 2 - 1
            matrix = hadamard(dim, host) * signs[None, :] / math.sqrt(dim)
        else:
            matrix, _ = torch.linalg.qr(torch.randn(dim, dim, generator=generator, device=host))
        _ROTATIONS[key] = matrix.to(device)
    return _ROTATIONS[key]


def byte_levels(bits: int, device) -> torch.Tensor:
    """``[256, 8 // bits]`` fp32: the codes packed in each byte value (low bits first)."""
    key = (bits, str(device))
    if key not in _BYTE_LEVELS:
        per_byte = 8 // bits
        values = torch.arange(256, device=device)[:, None] >> (torch.arange(per_byte, device=device)[None, :] * bits)
        _BYTE_LEVELS[key] = (values & ((1 << bits) - 1)).float()
    return _BYTE_LEVELS[key]


def _lane_view(packed: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``packed`` (uint8, contiguous last axis) viewed as the widest signed integers whose bytes
    it can hold along the last axis (int64, int32, int16 or itself), and that width in bytes."""
    for dtype, size in ((torch.int64, 8), (torch.int32, 4), (torch.int16, 2)):
        if packed.shape[-1] % size == 0 and packed.storage_offset() % size == 0 and packed.stride(-1) == 1 \
                and all(stride % size == 0 for stride in packed.stride()[:-1]):
            return packed.view(dtype), size
    return packed, 1


def _byte_mask(bits: int, size: int) -> int:
    """``(1 << bits) - 1`` in each of ``size`` bytes, as a signed ``8 * size``-bit integer."""
    mask = int.from_bytes(bytes([(1 << bits) - 1]) * size, "little")
    return mask - (1 << 8 * size) if size > 1 and mask >= 1 << (8 * size - 1) else mask


def unpack_slots(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 ``[..., width, n]`` -> uint8 ``[..., width, 8 / bits, n]``: slot ``i`` of byte ``[..., j, t]``
    (:func:`tokensift.quant.pack_codes`' order: low bits first) at ``[..., j, i, t]``.

    Shifts whole words (the bytes along the last axis read as int64 when they fit) and masks
    each byte's low ``bits`` bits: bits that cross into a byte from its neighbour are masked
    off, so the result is each byte's own slot whatever the byte order. x86 has no byte
    shifts; on the 2-core EPYC here this is about 2x cheaper than shifting uint8.
    """
    per_byte = 8 // bits
    lanes, size = _lane_view(packed)
    key = (bits, lanes.dtype, str(packed.device))
    if key not in _SHIFTS:
        _SHIFTS[key] = torch.arange(0, 8, bits, device=packed.device, dtype=lanes.dtype)[:, None]
    slots = lanes[..., None, :] >> _SHIFTS[key]
    slots &= _byte_mask(bits, size)
    return slots.view(torch.uint8).view(*packed.shape[:-1], per_byte, packed.shape[-1])


class GrowingBuffer:
    """A tensor that grows along axis 2 with a little spare room (``view()`` is the used part)."""

    def __init__(self):
        self.data: torch.Tensor | None = None
        self.length = 0

    def append(self, block: torch.Tensor, spare: int) -> None:
        needed = self.length + block.shape[2]
        if self.data is None or needed > self.data.shape[2]:
            grown = block.new_empty(*block.shape[:2], needed + spare, *block.shape[3:])
            if self.length:
                grown[:, :, : self.length] = self.data[:, :, : self.length]
            self.data = grown
        self.data[:, :, self.length:needed] = block
        self.length = needed

    def truncate(self, length: int) -> None:
        self.length = min(self.length, length)

    def view(self) -> torch.Tensor | None:
        return None if self.data is None else self.data[:, :, : self.length]

    @property
    def nbytes(self) -> int:
        return 0 if self.data is None else self.data.nbytes


class KeySketch:
    """Rotated, per-channel ``bits``-bit keys of one sequence in one layer, in groups of ``group``
    real tokens (padding is never sketched, so a sequence's sketch does not depend on how it was
    padded in a batch).

    Codes are held group by group, byte position by byte position: ``codes`` is uint8 ``[batch,
    heads, groups, dim * bits / 8, group]`` (the bytes :func:`tokensift.quant.pack_codes` makes of
    a token, transposed within each group), so unpacking and scoring run along contiguous runs
    of ``group`` tokens. Same bytes as token-major packing.
    """

    def __init__(self, bits: int, group: int, rotate: bool):
        self.bits, self.group, self.rotate = bits, group, rotate
        self.codes = GrowingBuffer()  # uint8 [batch, heads, groups, dim * bits / 8, group]
        self.scales = GrowingBuffer()  # fp16 [batch, heads, groups, dim]
        self.zeros = GrowingBuffer()
        self.mean_codes = GrowingBuffer()  # uint8 [batch, heads, groups, dim]: each group's mean value, 8-bit
        self.mean_scales = GrowingBuffer()  # fp16 [batch, heads, groups, 1]
        self.mean_zeros = GrowingBuffer()

    @property
    def count(self) -> int:
        """Tokens sketched so far (a multiple of ``group``)."""
        return self.codes.length * self.group

    @property
    def nbytes(self) -> int:
        return sum(buffer.nbytes for buffer in self.buffers)

    @property
    def buffers(self) -> tuple[GrowingBuffer, ...]:
        """Every buffer the sketch holds."""
        return self.codes, self.scales, self.zeros, self.mean_codes, self.mean_scales, self.mean_zeros

    def _rotated(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        return x @ rotation(x.shape[-1], x.device) if self.rotate else x

    def add(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Sketch ``keys`` ``[batch, heads, n * group, dim]`` (real tokens only) and keep the mean of
        each group's ``values`` (same shape)."""
        batch, heads, tokens, dim = keys.shape
        groups = tokens // self.group
        x = self._rotated(keys).view(batch, heads, groups, self.group, dim)
        low, high = x.amin(3), x.amax(3)
        levels = (1 << self.bits) - 1
        scale = ((high - low) / levels).clamp(min=EPS).to(SCALE_DTYPE)
        zero = low.to(SCALE_DTYPE)
        codes = ((x - zero.float()[:, :, :, None]) / scale.float()[:, :, :, None]).round().clamp(0, levels)
        packed = pack_codes(codes, self.bits)  # [batch, heads, groups, group, width]
        spare_groups = max(1, groups // 64)  # room to grow, counted as held
        self.codes.append(packed.transpose(-1, -2).contiguous(), spare_groups)
        self.scales.append(scale, spare_groups)
        self.zeros.append(zero, spare_groups)
        means = quantize_tokens(values.float().view(batch, heads, groups, self.group, values.shape[-1]).mean(3), 8)
        self.mean_codes.append(means.packed, spare_groups)
        self.mean_scales.append(means.scale, spare_groups)
        self.mean_zeros.append(means.zero, spare_groups)

    def value_means(self) -> torch.Tensor:
        """fp32 ``[batch, heads, groups, dim]``: each group's mean value, as held (8-bit)."""
        return self.mean_codes.view().float() * self.mean_scales.view().float() + self.mean_zeros.view().float()

    def packed_tokens(self) -> torch.Tensor:
        """uint8 ``[batch, heads, count, dim * bits / 8]``: each token's packed bytes (a copy)."""
        codes = self.codes.view()
        batch, heads, groups, width, group = codes.shape
        return codes.transpose(-1, -2).reshape(batch, heads, groups * group, width)

    def codes_as_float(self) -> torch.Tensor:
        """fp32 ``[batch, heads, count, dim]`` integer levels, unpacked through a byte table."""
        packed = self.packed_tokens()
        table = byte_levels(self.bits, packed.device)
        batch, heads, tokens, width = packed.shape
        return torch.nn.functional.embedding(packed.long(), table).view(batch, heads, tokens, width * table.shape[1])

    def dequantized(self) -> torch.Tensor:
        """fp32 ``[batch, heads, count, dim]`` rotated keys as the sketch holds them."""
        codes = self.codes_as_float()
        batch, heads, tokens, dim = codes.shape
        codes = codes.view(batch, heads, tokens // self.group, self.group, dim)
        keys = codes * self.scales.view().float()[:, :, :, None] + self.zeros.view().float()[:, :, :, None]
        return keys.view(batch, heads, tokens, dim)

    def _scaled_query(self, query: torch.Tensor, scaling: float):
        """``(weights, offset)``: the rotated query times each group's scales ``[batch, kv_heads,
        groups, query group, dim]``, and its dot product with each group's zero-points
        ``[batch, kv_heads, groups, query group, 1]``."""
        batch, kv_heads = self.scales.view().shape[:2]
        q_heads, dim = query.shape[1], query.shape[-1]
        q = self._rotated(query).reshape(batch, kv_heads, 1, q_heads // kv_heads, dim) * scaling
        # fp16 * fp32 promotes to fp32: the same numbers as converting the scales first, one op fewer
        return q * self.scales.view()[:, :, :, None], (q * self.zeros.view()[:, :, :, None]).sum(-1)[..., None]

    def logits(self, query: torch.Tensor, scaling: float) -> torch.Tensor:
        """Approximate ``q·k * scaling`` of one query token per query head: ``[batch, q_heads, count]``.

        Per group, ``q·(codes * scale + zero) = codes · (q * scale) + q · zero``: the scales fold
        into the query, so the codes are multiplied as they are, never dequantized. The codes
        are unpacked by word shifts (:func:`unpack_slots`) straight into ``[dim, group]`` per group
        and multiplied as ``(q * scale) @ codes`` (a few query rows against ``group`` columns,
        4x cheaper on this CPU than the transposed product), or, on a CPU, by one compiled loop that
        unpacks in registers (:mod:`tokensift.storage.sketch_native`). Equals :meth:`logits_reference` up to
        float rounding (the same products, summed in another order).
        """
        packed = self.codes.view()
        batch, kv_heads, groups, width, group = packed.shape
        q_heads = query.shape[1]
        weights, offset = self._scaled_query(query, scaling)
        if sketch_native.wanted(packed):
            compiled = sketch_native.scores(packed, weights, offset, self.bits)
            if compiled is not None:
                return compiled
        codes = unpack_slots(packed, self.bits).to(torch.float32).view(batch, kv_heads, groups, -1, group)
        logits = torch.matmul(weights, codes) + offset  # [batch, kv_heads, groups, query group, group]
        return logits.permute(0, 1, 3, 2, 4).reshape(batch, q_heads, groups * group)

    def choose_compiled(self, query: torch.Tensor, scaling: float, k: int, sinks: int, forced_from: int,
                        share: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """A decode step's top ``k`` over this (one-sequence, CPU) sketch and the unread weight per
        group, in one compiled call (:func:`sketch_native.choose`); None where it does not run."""
        packed = self.codes.view()
        if packed.shape[0] != 1 or not sketch_native.wanted(packed) or sketch_native.module() is None:
            return None
        weights, offset = self._scaled_query(query, scaling)
        return sketch_native.choose(packed, weights, offset, self.bits, k, sinks, forced_from, share)

    def logits_reference(self, query: torch.Tensor, scaling: float) -> torch.Tensor:
        """:meth:`logits` computed the plain way (codes through a byte table, ``codes @ (q *
        scale)ᵀ``): the reference the fast path is tested against."""
        codes = self.codes_as_float()
        batch, kv_heads, tokens, dim = codes.shape
        groups, q_heads = tokens // self.group, query.shape[1]
        weights, offset = self._scaled_query(query, scaling)
        weighted = codes.view(batch, kv_heads, groups, self.group, dim) @ weights.transpose(-1, -2)
        logits = (weighted + offset.transpose(-1, -2)).permute(0, 1, 4, 2, 3)  # [batch, kv_heads, query group, groups, group]
        return logits.reshape(batch, q_heads, tokens)

    def truncate(self, tokens: int) -> None:
        """Forget the groups that reach past ``tokens`` (speculative rollback, crop)."""
        groups = min(tokens, self.count) // self.group
        self.codes.truncate(groups)
        self.scales.truncate(groups)
        self.zeros.truncate(groups)
        for buffer in (self.mean_codes, self.mean_scales, self.mean_zeros):
            buffer.truncate(groups)
