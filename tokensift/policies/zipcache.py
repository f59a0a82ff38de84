"""ZipCache: mixed-precision K/V by normalized-attention saliency (optionally with eviction)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokensift.errors import TokensiftError
from tokensift.policies.base import Policy
from tokensift.policies.registry import register
from tokensift.quant import check_bits
from tokensift.scoring import pad_to


@register
@dataclass
class ZipCache(Policy):
    """Quantize instead of dropping: salient tokens at ``hi_bits``, the rest at ``lo_bits``.

    He et al., "ZipCache: Accurate and Efficient KV Cache Quantization with Salient Token
    Identification" (NeurIPS 2024, arXiv:2405.14256). Saliency is *normalized* attention:
    the attention a token received, summed over every query that could see it, divided by
    the number of those queries (the causal mask lets early tokens collect from more
    queries). The top ``salient_ratio`` of each block of tokens (per KV head) is stored at
    ``hi_bits``, the others at ``lo_bits``, with channel-separable tokenwise quantization
    packed into uint8 (:mod:`tokensift.quant`, :mod:`tokensift.storage.quantized`). The
    last ``window`` tokens stay in full precision until they leave the window (as in
    ZipCache/KIVI); older ones are quantized in blocks of at least ``group`` tokens (the
    whole prompt at once after prefill). Without ``budget``/``ratio`` nothing is evicted;
    with one, the lowest-saliency tokens are evicted first and what is kept is quantized.

    Parameters
    ----------
    salient_ratio : float, default 0.3
        Fraction of each block's tokens (per KV head) stored at ``hi_bits``.
    hi_bits : int, default 4
        Bits per element of the salient tokens (2, 4 or 8).
    lo_bits : int, default 2
        Bits per element of the other tokens (2, 4 or 8).
    group : int, default 64
        Fewest tokens quantized at once once they leave the full-precision window.
    budget, ratio : int or float, optional
        Evict down to this size first (lowest saliency first); neither: keep every token.
    window : int, default 32
        Also the recent tokens held in full precision.

    Plus the other common parameters of :class:`~tokensift.policies.base.Policy`.
    """

    name = "zipcache"
    paper = "He et al. 2024, ZipCache: Accurate and Efficient KV Cache Quantization with Salient Token Identification (arXiv:2405.14256)"
    needs_attention = True
    evicts = False  # by default; a budget or ratio turns eviction on
    storage = "tokensift.storage.quantized:QuantizedLayer"
    salient_ratio: float = 0.3
    hi_bits: int = 4
    lo_bits: int = 2
    group: int = 64

    @property
    def evicting(self) -> bool:
        return self.budget is not None or self.ratio is not None

    def validate(self) -> None:
        check_bits(self.hi_bits)
        check_bits(self.lo_bits)
        if not 0.0 <= self.salient_ratio <= 1.0:
            raise TokensiftError(f"zipcache: salient_ratio must be in [0, 1] (got {self.salient_ratio})")
        if self.group < 1:
            raise TokensiftError(f"zipcache: group must be >= 1 (got {self.group})")
        if self.n_sink < 0 or self.window < 0 or self.interval < 1:
            raise TokensiftError(f"zipcache: need n_sink, window >= 0 and interval >= 1 (got {self.n_sink}, {self.window}, {self.interval})")
        if self.budget is not None and self.ratio is not None:
            raise TokensiftError("policy 'zipcache' takes at most one of budget=N or ratio=R")
        self.check_size()

    def layer_budget(self, layer_idx: int, num_layers: int, seen: int) -> int | None:
        return self.size_budget(seen) if self.evicting else None

    def observe(self, layer, view) -> None:
        running = pad_to(layer.token_state.get("zip_attn"), layer.kept, layer.keys)
        layer.token_state["zip_attn"] = running + view.column_sum()

    def saliency(self, layer) -> torch.Tensor:
        """Normalized attention ``[batch, heads, kept]``: received attention / queries that saw it."""
        queries = (layer.valid_seen[:, None, None] - layer.ranks).clamp(min=1).float()
        return layer.token_state["zip_attn"] / queries

    def score(self, layer) -> torch.Tensor:
        return self.saliency(layer)

    def describe(self) -> str:
        bits = f"{self.hi_bits}/{self.lo_bits}-bit"
        if not self.evicting:
            return f"{self.name}({bits})"
        size = f"budget={self.budget}" if self.budget is not None else f"ratio={self.ratio}"
        return f"{self.name}({bits}, {size})"
