"""A resident low-bit sketch of every key, used only to choose which exact rows to read.

Keys are rotated by a fixed random Hadamard matrix (QuaRot, Ashkboos et al. 2024,
arXiv:2404.00456: q·k is unchanged when the query is rotated the same way, and the rotation
spreads outlier channels), then quantized per *channel* over groups of ``group`` tokens (KIVI,
Liu et al. 2024, arXiv:2402.02750: each channel of a group gets its own fp16 scale and
zero-point) at ``bits`` bits, packed into uint8. Scores are q·k against the dequantized sketch:
they rank tokens (Quest, ShadowKV: a ranking tolerates coarse keys) and are never attended with.

Memory per token and KV head: ``dim * bits / 8`` bytes of codes plus ``4 * dim / group`` bytes
of scales and zero-points (2-bit, dim 64, group 128: 18 bytes, against 256 for bf16 K+V).
"""

from __future__ import annotations

import math

import torch

from tokensift.quant import EPS, SCALE_DTYPE, pack_codes

_ROTATIONS: dict[tuple, torch.Tensor] = {}
_BYTE_LEVELS: dict[tuple, torch.Tensor] = {}


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
    padded in a batch)."""

    def __init__(self, bits: int, group: int, rotate: bool):
        self.bits, self.group, self.rotate = bits, group, rotate
        self.codes = GrowingBuffer()  # uint8 [batch, heads, tokens, dim * bits / 8]
        self.scales = GrowingBuffer()  # fp16 [batch, heads, groups, dim]
        self.zeros = GrowingBuffer()

    @property
    def count(self) -> int:
        """Tokens sketched so far (a multiple of ``group``)."""
        return self.codes.length

    @property
    def nbytes(self) -> int:
        return self.codes.nbytes + self.scales.nbytes + self.zeros.nbytes

    def _rotated(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        return x @ rotation(x.shape[-1], x.device) if self.rotate else x

    def add(self, keys: torch.Tensor) -> None:
        """Sketch ``keys`` ``[batch, heads, n * group, dim]`` (real tokens only)."""
        batch, heads, tokens, dim = keys.shape
        groups = tokens // self.group
        x = self._rotated(keys).view(batch, heads, groups, self.group, dim)
        low, high = x.amin(3), x.amax(3)
        levels = (1 << self.bits) - 1
        scale = ((high - low) / levels).clamp(min=EPS).to(SCALE_DTYPE)
        zero = low.to(SCALE_DTYPE)
        codes = ((x - zero.float()[:, :, :, None]) / scale.float()[:, :, :, None]).round().clamp(0, levels)
        spare_groups = max(1, groups // 16)
        self.codes.append(pack_codes(codes.view(batch, heads, tokens, dim), self.bits), spare_groups * self.group)
        self.scales.append(scale, spare_groups)
        self.zeros.append(zero, spare_groups)

    def codes_as_float(self) -> torch.Tensor:
        """fp32 ``[batch, heads, count, dim]`` integer levels, unpacked through a byte table."""
        packed = self.codes.view()
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

    def logits(self, query: torch.Tensor, scaling: float) -> torch.Tensor:
        """Approximate ``q·k * scaling`` of one query token per query head: ``[batch, q_heads, count]``.

        Per group, ``q·(codes * scale + zero) = codes · (q * scale) + q · zero``: the scales fold
        into the query, so the codes are multiplied as they are.
        """
        codes = self.codes_as_float()
        batch, kv_heads, tokens, dim = codes.shape
        groups, q_heads = tokens // self.group, query.shape[1]
        q = self._rotated(query).reshape(batch, kv_heads, 1, q_heads // kv_heads, dim) * scaling
        scales, zeros = self.scales.view().float()[:, :, :, None], self.zeros.view().float()[:, :, :, None]
        weighted = codes.view(batch, kv_heads, groups, self.group, dim) @ (q * scales).transpose(-1, -2)
        offset = (q * zeros).sum(-1)[:, :, :, None]  # [batch, kv_heads, groups, 1, query group]
        logits = (weighted + offset).permute(0, 1, 4, 2, 3)  # [batch, kv_heads, query group, groups, group]
        return logits.reshape(batch, q_heads, tokens)

    def truncate(self, tokens: int) -> None:
        """Forget the groups that reach past ``tokens`` (speculative rollback, crop)."""
        groups = min(tokens, self.count) // self.group
        self.codes.truncate(groups * self.group)
        self.scales.truncate(groups)
        self.zeros.truncate(groups)
