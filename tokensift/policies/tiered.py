"""Tiered: choose from a resident 2-bit key sketch, read the exact rows from a second tier."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar
from pathlib import Path

import torch

from tokensift.errors import TokensiftError
from tokensift.policies.registry import register
from tokensift.quant import check_bits
from tokensift.policies.sparse_base import SparsePolicy
from tokensift.selection import (
    NEG_INF, POS_INF, count, forced_mask, gather_attend, reuse_read, to_query_heads, top_k,
)

SELECTION = "tiered_selection"  # layer.state key of the selection reused between refreshes


def default_tier_folder() -> Path:
    from tokensift.models import cache_root

    return cache_root() / "tier"


@register
@dataclass
class Tiered(SparsePolicy):
    """Keep every token, but hold only a low-bit sketch of the keys in memory.

    Synthesized from ShadowKV (Sun et al. 2024, arXiv:2410.21465: a small resident key
    representation chooses which rows to fetch from host memory), Quest (Tang et al. 2024,
    arXiv:2406.10774: rank cheaply, attend exactly), KIVI (Liu et al. 2024, arXiv:2402.02750:
    keys quantized per channel) and QuaRot's Hadamard rotation (arXiv:2404.00456). Each
    decode step scores every token against the sketch, reads the ``k`` best per KV head
    (sinks and the last ``window`` tokens forced in, plus the newest tokens not sketched yet)
    exactly from the second tier and attends over them, plus one row per sketch group standing for
    the group's tokens not read (their summed sketch weight, the group's mean value: RetroInfer's
    estimated middle tier, Chen et al. 2025, arXiv:2505.02922). Blocks of several tokens (prefill, a
    question asked later, draft trees) read every row exactly, so a question asked after
    compression sees the whole context.

    Parameters
    ----------
    k : int
        Tokens read per KV head (per query head with ``share=False``) per decode step
        (``budget=`` is an alias).
    bits : int, default 2
        Bits per sketch element: 2, 4 or 8.
    group : int, default 128
        Tokens per sketch group (one fp16 scale and zero-point per channel and group).
    rotate : bool, default True
        Rotate keys (and queries) by a fixed random Hadamard matrix before sketching.
    tier : str, default "file"
        Where the exact rows live: ``file`` (a memory-mapped file in ``tier_dir``) or ``host``
        (CPU memory; outside the model's memory only when the model runs on an accelerator).
    tier_dir : str or None, default None
        Folder of the tier files (None: ``$TOKENSIFT_CACHE/tier``); files are unlinked at once.
    window_bits : int, default 4
        Sliding-window layers (Gemma 3's local layers) hold their window as ``window_bits``-bit
        codes per token and group of ``window_group`` channels (0: leave them in full precision).
    window_key_bits : int, default 0
        Bits of those windows' keys when they differ from their values' (0: ``window_bits``);
        keys carry outlier channels and suffer more from few bits (KIVI, KVQuant).
    window_group : int, default 64
        Channels per scale and zero-point in those layers.
    tail : bool, default True
        Add the unread tokens' estimated share to the attention (one row per sketch group) instead
        of dropping it. Without it a small model loses answers whose attention is spread over many
        tokens: on SmolLM2 at 4k, exact top-512 attention gets 3 of 4 such multi-needle prompts wrong.
    share : bool, default True
        Choose ``k`` tokens per KV head, read by all its query heads (ranked by the largest
        attention probability any of them gives a token), instead of ``k`` per query head: a third
        of the top-k and of the rows fetched with 3 query heads per KV head.
    refresh : int, default 1
        Decode steps one selection serves: the sketch is scored every ``refresh`` steps and the
        steps between read the same tokens plus those added since (1: score every step).

    Plus ``n_sink`` and ``window`` (always read) of :class:`~tokensift.policies.sparse_base.SparsePolicy`;
    it keeps every token and takes no base policy (``inner``, ``base``, ``base_budget`` and
    ``base_ratio`` are refused).
    """

    name = "tiered"
    paper = "ShadowKV (arXiv:2410.21465) + Quest (arXiv:2406.10774): resident 2-bit key sketch (KIVI, QuaRot rotation), exact rows in a second tier"

    takes_base: ClassVar[bool] = False
    storage = "tokensift.storage.tiered:TieredLayer"

    bits: int = 2
    group: int = 128
    rotate: bool = True
    tier: str = "file"
    tier_dir: str | None = None
    refresh: int = 1
    tail: bool = True
    share: bool = True
    window_bits: int = 4
    window_key_bits: int = 0
    window_group: int = 64

    def validate_method(self) -> None:
        from tokensift.storage.tier import KINDS, check_folder

        check_bits(self.bits)
        if self.group < 1:
            raise TokensiftError(f"tiered: group must be >= 1 (got {self.group})")
        if self.window_bits:
            check_bits(self.window_bits)
        if self.window_key_bits:
            check_bits(self.window_key_bits)
        if self.window_group < 1:
            raise TokensiftError(f"tiered: window_group must be >= 1 (got {self.window_group})")
        if self.refresh < 1:
            raise TokensiftError(f"tiered: refresh must be >= 1 (got {self.refresh})")
        if self.tier not in KINDS:
            raise TokensiftError(f"tiered: tier must be one of {', '.join(KINDS)} (got '{self.tier}')")
        if self.base is not None:
            raise TokensiftError("tiered keeps every token in its second tier: it takes no base policy")
        if self.tier == "file":
            check_folder(self.tier_folder)

    @property
    def tier_folder(self) -> Path:
        return Path(self.tier_dir) if self.tier_dir else default_tier_folder()

    def sliding_layer(self, kind: str, kwargs: dict):
        from tokensift.storage.window import QuantizedWindowLayer

        if kind != "sliding_attention" or not self.window_bits:
            return None
        return QuantizedWindowLayer(bits=self.window_bits, group=self.window_group, key_bits=self.window_key_bits or None,
                                    **kwargs)

    def read(self, layer, query, key, value, query_valid, scaling):
        saved = layer.state.get(SELECTION)
        if saved is not None and layer.seen - saved["seen"] < self.refresh and saved["ok"].shape[0] == query.shape[0]:
            count(layer, "reused")
            count(layer, "fetched_rows", int(saved["ok"].sum()) + (layer.seen - saved["seen"]) * saved["ok"].shape[1])
            if layer.padded:
                return reuse_read(layer, query, key, value, query_valid, scaling, saved, saved["extra"])
            index, ok = self.reused_unpadded(layer, saved)
            return gather_attend(query, key, value, index, ok, scaling, query_valid, saved["extra"])
        index, ok, mass, peak = self.choose(layer, query, scaling)
        extra = layer.unread_rows(mass, peak) if self.tail else None
        count(layer, "fetched_rows", int(ok.sum()))
        if self.refresh > 1:  # every token is kept: positions are storage slots (what save_selection stores)
            layer.state[SELECTION] = {"positions": index, "ok": ok, "seen": layer.seen, "extra": extra}
        return gather_attend(query, key, value, index, ok, scaling, query_valid, extra)

    @staticmethod
    def reused_unpadded(layer, saved: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """What ``reuse_read`` reads for a layer without padding: the stored selection and every
        token added since, as a range (positions are slots and every slot is valid, so its
        position lookup and validity gather change nothing)."""
        return _then_slots(saved["positions"], saved["ok"], saved["seen"], layer.seen)

    def choose(self, layer, query, scaling):
        """What a decode step reads, ``(index, ok, mass, peak)``: storage indices ``[batch, heads, n]``
        (``heads``: KV heads, or query heads with ``share=False``) of the sketch's top ``k`` (sinks and
        window forced in), then every real token not sketched yet; and the sketch's attention
        weights ``exp(logit - peak)`` of the tokens not read, summed per query head and sketch group
        (what :meth:`TieredLayer.unread_rows` attends; None with ``tail=False`` on the eager paths).
        One compiled call where it runs (:meth:`choose_compiled`), else PyTorch ops."""
        compiled = self.choose_compiled(layer, query, scaling)
        if compiled is not None:
            return compiled
        chosen = self.choose_unpadded(layer, query, scaling) or self.choose_general(layer, query, scaling)
        index, ok, weights, peak = chosen
        return index, ok, layer.unread_mass(weights) if self.tail else None, peak

    def choose_compiled(self, layer, query, scaling):
        """:meth:`choose` for one unpadded sequence on a CPU, in one call to the compiled sketch
        kernel (scores, weights, top ``k``, group sums; the choice :meth:`choose_unpadded` makes, up
        to float rounding of the weights), or None where it does not apply."""
        if layer.padded or len(layer.sketches) != 1:
            return None
        seen, sketched, k = layer.seen, layer.sketches[0].count, min(self.k, layer.seen)
        sinks, forced_from = self.forced_slots(seen, sketched)
        if k > sketched or sinks + max(0, sketched - max(forced_from, sinks)) > k:
            return None
        chosen = layer.sketches[0].choose_compiled(query, scaling, k, sinks, forced_from, self.share)
        if chosen is None:
            return None
        index, mass, peak = chosen
        return *_then_slots(index, torch.ones_like(index, dtype=torch.bool), sketched, seen), mass, peak

    def choose_general(self, layer, query, scaling):
        """:meth:`choose` for any layer (padding, unequal sketches): masks over every slot."""
        logits, sketched = layer.sketch_logits(query, scaling)
        weights, peak = _weights(logits)
        heads = layer.valid.shape[1] if self.share else query.shape[1]
        allowed = to_query_heads(layer.valid & sketched[:, None], heads)
        forced = to_query_heads(forced_mask(layer), heads) & allowed
        picked, picked_ok = top_k(self.scores(logits, weights, heads), self.k, forced, allowed)
        # a pick that is not ok means every allowed slot was picked: slot 0 is then picked or weighs 0 already
        _forget_read(weights, picked.masked_fill(~picked_ok, 0))
        recent, recent_ok = layer.unsketched_slots()  # not sketched yet: always read
        shape = (query.shape[0], heads, recent.shape[-1])
        index, ok = torch.cat([picked, recent.expand(shape)], -1), torch.cat([picked_ok, recent_ok.expand(shape)], -1)
        return index, ok, weights, peak

    def choose_unpadded(self, layer, query, scaling):
        """:meth:`choose` for a layer without padding whose sequences have sketched the same
        ``sketched >= k`` tokens (decoding one prompt, or a batch of equal lengths), else None.

        Then slot == position == rank: the sketched slots are ``0..sketched``, the sinks the first
        ``n_sink`` slots and the window the last ``window`` ones, so the top ``k`` is taken over the
        sketch's own scores with the forced slots set to +inf in place, the unsketched slots
        ``sketched..seen`` are a range, and no ``seen``-long -inf tensor, mask or per-row loop is
        built. Same choice as :meth:`choose_general` (the same top ``k`` of the same scores).
        """
        seen, k = layer.seen, min(self.k, layer.seen)
        sketched = layer.sketches[0].count if layer.sketches else 0
        if k > sketched or layer.padded:  # the general path pads the choice with empty slots
            return None
        logits = layer.sketched_prefix_logits(query, scaling)
        if logits is None:
            return None
        weights, peak = _weights(logits)
        scores = self.scores(logits, weights, layer.keys.shape[1] if self.share else query.shape[1])
        sinks, forced_from = self.forced_slots(seen, sketched)  # forced_mask: sinks, window, newest token
        scores[..., :sinks] = POS_INF
        scores[..., forced_from:sketched] = POS_INF
        values, index = scores.topk(k, dim=-1, sorted=False)
        index, order = index.sort(dim=-1)
        _forget_read(weights, index)
        return *_then_slots(index, values.gather(-1, order) > NEG_INF, sketched, seen), weights, peak

    def forced_slots(self, seen: int, sketched: int) -> tuple[int, int]:
        """``(sinks, forced_from)``: of the sketched slots ``0..sketched`` of a layer without padding,
        those below ``sinks`` and from ``forced_from`` on are always read (sinks, the recent window,
        the newest token; ``forced_from == sketched`` when the window starts after the sketch)."""
        start = min(seen - self.window, seen - 1)
        return min(self.n_sink, sketched), max(start, 0) if start < sketched else sketched

    @staticmethod
    def scores(logits: torch.Tensor, weights: torch.Tensor, heads: int) -> torch.Tensor:
        """What the top ``k`` is taken over, ``[batch, heads, slots]`` (a new tensor or ``logits``, to be
        overwritten): per query head its sketch logits; per KV head, the largest attention
        probability any of its query heads gives the token (each head's weights over their sum)."""
        batch, q_heads, slots = logits.shape
        if heads == q_heads:
            return logits
        probabilities = weights / weights.sum(-1, keepdim=True).clamp(min=torch.finfo(weights.dtype).tiny)
        return probabilities.view(batch, heads, q_heads // heads, slots).amax(2)

    def describe(self) -> str:
        refresh = f",refresh={self.refresh}" if self.refresh > 1 else ""
        tail = "" if self.tail else ",no tail"
        per = "" if self.share else ",k per query head"
        return f"{self.name}(k={self.k},{self.bits}-bit,{self.tier}{per}{refresh}{tail}{self._describe_windows()})"

    def _describe_windows(self) -> str:
        """The sliding-window precision when it is not the default 4-bit keys and values."""
        if not self.window_bits:
            return ",exact windows"
        if self.window_bits == 4 and self.window_key_bits in (0, 4):
            return ""
        return f",windows {self.window_key_bits or self.window_bits}/{self.window_bits}-bit"


def _weights(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(exp(logits - peak), peak)`` with ``peak`` each row's largest logit (0 for a row without
    any): attention weights up to each row's normalisation, no overflow."""
    peak = logits.amax(-1, keepdim=True).nan_to_num(neginf=0.0)
    return (logits - peak).exp_(), peak


def _forget_read(weights: torch.Tensor, index: torch.Tensor) -> None:
    """Set ``weights`` ``[batch, q_heads, slots]`` to 0 at the slots read, ``index`` ``[batch, heads, n]``
    (``heads`` divides the query heads: a KV head's choice is read by each of its query heads)."""
    batch, q_heads, slots = weights.shape
    heads, n = index.shape[1:]
    per_head = q_heads // heads
    weights.view(batch, heads, per_head, slots).scatter_(-1, index[:, :, None].expand(batch, heads, per_head, n), 0.0)


def _then_slots(index: torch.Tensor, ok: torch.Tensor, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``index``/``ok`` (``[batch, q_heads, n]``) followed by every slot ``start..end`` (all read)."""
    recent = torch.arange(start, end, device=index.device).expand(*index.shape[:2], -1)
    return torch.cat([index, recent], -1), torch.cat([ok, ok.new_ones(recent.shape)], -1)
