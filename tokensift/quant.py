"""Integer quantization of K/V: channel-separable tokenwise, really packed into uint8.

ZipCache's scheme: divide each channel by a per-channel scale (its absolute maximum over
the tokens quantized together), then quantize each token with its own asymmetric
scale/zero-point at ``bits`` bits (2, 4 or 8). Codes are packed ``8 // bits`` to a byte
along the channel axis (low bits first). Scales, zero-points and channel scales are fp16,
and the codes are computed against the fp16-rounded parameters, so dequantization is exact
arithmetic on what is stored.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokensift.errors import TokensiftError

BITS = (2, 4, 8)
SCALE_DTYPE = torch.float16
EPS = 1e-6


def check_bits(bits: int) -> None:
    if bits not in BITS:
        raise TokensiftError(f"bit width must be one of {BITS} (got {bits})")


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes ``[..., d]`` (each < 2**bits) -> ``[..., d * bits / 8]`` uint8."""
    check_bits(bits)
    per_byte = 8 // bits
    if codes.shape[-1] % per_byte:
        raise TokensiftError(f"head dim {codes.shape[-1]} is not a multiple of {per_byte} ({bits}-bit packing)")
    grouped = codes.to(torch.uint8).reshape(*codes.shape[:-1], -1, per_byte)
    packed = torch.zeros(grouped.shape[:-1], dtype=torch.uint8, device=codes.device)
    for slot in range(per_byte):
        packed |= grouped[..., slot] << (slot * bits)
    return packed


def unpack_codes(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: ``[..., d * bits / 8]`` -> uint8 codes ``[..., d]``."""
    per_byte = 8 // bits
    mask = (1 << bits) - 1
    parts = [(packed >> (slot * bits)) & mask for slot in range(per_byte)]
    return torch.stack(parts, dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * per_byte)


@dataclass
class QuantTensor:
    """Tokens quantized at one bit width: packed codes ``[..., n, d*bits/8]``, fp16 scale/zero ``[..., n, 1]``."""

    packed: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    bits: int

    @property
    def nbytes(self) -> int:
        return self.packed.nbytes + self.scale.nbytes + self.zero.nbytes

    def dequantize(self) -> torch.Tensor:
        """fp32 ``[..., n, d]`` (still normalized by the channel scale)."""
        return unpack_codes(self.packed, self.bits).float() * self.scale.float() + self.zero.float()


def quantize_tokens(x: torch.Tensor, bits: int) -> QuantTensor:
    """Asymmetric per-token (last axis) quantization of ``[..., n, d]``."""
    check_bits(bits)
    x = x.float()
    levels = (1 << bits) - 1
    low = x.amin(dim=-1, keepdim=True)
    high = x.amax(dim=-1, keepdim=True)
    scale = ((high - low) / levels).clamp(min=EPS).to(SCALE_DTYPE)
    zero = low.to(SCALE_DTYPE)
    codes = torch.round((x - zero.float()) / scale.float()).clamp(0, levels).to(torch.uint8)
    return QuantTensor(pack_codes(codes, bits), scale, zero, bits)


def channel_scale(x: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """fp16 ``[..., 1, d]``: per-channel absolute maximum over the tokens (valid ones only)."""
    x = x.float().abs()
    if valid is not None:
        x = x * valid[..., None].float()
    if x.shape[-2] == 0:  # no tokens (a batch row whose span is all padding): any scale will do
        return x.new_full((*x.shape[:-2], 1, x.shape[-1]), EPS).to(SCALE_DTYPE)
    return x.amax(dim=-2, keepdim=True).clamp(min=EPS).to(SCALE_DTYPE)


def quantize_channel_separable(x: torch.Tensor, bits: int, scale: torch.Tensor) -> QuantTensor:
    """Channel-separable tokenwise quantization of ``[..., n, d]`` with channel ``scale`` ``[..., 1, d]``."""
    return quantize_tokens(x.float() / scale.float(), bits)


def dequantize_channel_separable(q: QuantTensor, scale: torch.Tensor) -> torch.Tensor:
    """fp32 ``[..., n, d]`` from a channel-separable quantized tensor."""
    return q.dequantize() * scale.float()
