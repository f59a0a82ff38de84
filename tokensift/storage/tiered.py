"""A layer that keeps only a key sketch resident and every exact K/V row in a second tier.

Every token is kept (nothing is evicted), so per-token metadata is implicit: one bool per
token and sequence (``mask``, False for padding) is all that is held; positions are the token
indices, ranks count the real tokens before. What the layer holds in memory (``kv_bytes``) is
the sketch (:mod:`tokensift.storage.sketch`) and that mask; the exact rows live in the tier
(:mod:`tokensift.storage.tier`, ``tier_bytes``) and are read:

- all of them for a block of several new tokens (prefill, a question, a draft tree), through
  transformers' own SDPA, exactly as a full cache would;
- only the chosen ones for a single-token decode step (the policy's ``read``), counted in
  ``state["sparse"]["fetched_rows"]``.

Keys are sketched in whole groups once they are in the tier (after each forward, unless
eviction is deferred for speculative verification); the newest, not yet sketched tokens are
always read.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from transformers.cache_utils import CacheLayerMixin

from tokensift.cache import SelectingLayer
from tokensift.storage.sketch import KeySketch
from tokensift.storage.tier import SecondTier
from tokensift.tokens import TokenStore

MIN_SPARE_ROWS = 64


class TieredLayer(SelectingLayer):
    """Resident key sketch + exact rows in a second tier (see module docstring)."""

    subset_prefill = False  # positions are implicit (every token kept): no pruning prefill

    def __init__(self, layer_idx: int, num_layers: int, policy):
        self.store = TokenStore(dict.fromkeys(("keys", "values")))  # views of the tier's rows
        CacheLayerMixin.__init__(self)
        self.layer_idx, self.num_layers, self.policy = layer_idx, num_layers, policy
        self.depth, self.depths = layer_idx, num_layers
        self.defer_eviction = False
        self.lazy = False
        self.shared: dict = {}
        self._forget_tokens()

    def _forget_tokens(self) -> None:
        self.store.clear()
        self.keys = self.values = None
        self.is_initialized = False
        self.seen = 0
        self.compressed = False  # attention stays stock SDPA except on sparse reads
        self._pending = self._unmarked = 0
        self.state: dict = {}
        self.tier: SecondTier | None = None
        self.sketches: list[KeySketch] = []  # one per sequence: groups of its real tokens
        self.mask: torch.Tensor | None = None  # [batch, seen] bool: real token (not padding)
        self._metadata: dict | None = None

    # ------------------------------------------------------------ transformers API
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        batch, heads, new, dim = key_states.shape
        self.dtype, self.device = key_states.dtype, key_states.device
        capacity = new + max(new // 8, MIN_SPARE_ROWS)
        self.tier = SecondTier(self.policy.tier, Path(self.policy.tier_folder), (batch, heads, capacity, dim), key_states.dtype)
        self.mask = torch.zeros(batch, 0, dtype=torch.bool, device=self.device)
        policy = self.policy
        self.sketches = [KeySketch(policy.bits, policy.group, policy.rotate) for _ in range(batch)]
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Write the new rows to the tier; return what attention reads (the block itself when it
        is the first one, else views of every row)."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        first, new = self.seen == 0, key_states.shape[2]
        self.tier = self.tier.grown(self.seen + new)
        self.tier.write(self.seen, key_states, value_states)
        self.mask = torch.cat([self.mask, self.mask.new_ones(self.mask.shape[0], new)], dim=1)
        self.seen += new
        self._refresh_views()
        keys, values = (key_states, value_states) if first else self.readable()
        return keys, values

    def readable(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every row, on the device the model computes on (no copy when that is the tier's)."""
        return self.keys.to(self.device), self.values.to(self.device)

    def _refresh_views(self) -> None:
        self.keys, self.values = self.tier.view(self.seen)
        self._metadata = None

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seen + query_length, 0

    def crop(self, max_length: int) -> None:
        count = -max_length if max_length < 0 else self.seen - max_length
        if count > 0 and self.is_initialized:
            self._truncate(self.seen - count)

    def _truncate(self, length: int) -> None:
        self._forget_sketches_after(length)
        self.seen = self.tier.length = length
        self.mask = self.mask[:, :length].clone()  # a view would keep (and hide) the longer mask
        self._refresh_views()

    def _forget_sketches_after(self, length: int) -> None:
        """Drop the sketch groups that reach past slot ``length``, and any saved selection (rollback, crop)."""
        self.state.pop("tiered_selection", None)
        real_before = self.mask[:, :length].sum(1).tolist()
        for sketch, real in zip(self.sketches, real_before):
            sketch.truncate(real)

    def keep_new_tokens(self, new: int, indices) -> None:
        """Speculative rollback: keep the past and ``indices`` of the ``new`` newest tokens."""
        if not self.is_initialized or new == 0:
            return
        rows = torch.as_tensor(indices, dtype=torch.long, device=self.device)
        start = self.seen - new
        self._forget_sketches_after(start)
        self.tier.keep_rows(start, rows)
        self.mask = torch.cat([self.mask[:, :start], self.mask[:, start + rows]], dim=1)
        self.seen = start + int(rows.numel())
        self._refresh_views()

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        indices = torch.as_tensor(indices, dtype=torch.long)
        self.tier = self.tier.select_batch(indices)
        self.sketches = [copy.deepcopy(self.sketches[i]) for i in indices.tolist()]
        self.mask = self.mask[indices.to(self.mask.device)]
        self._refresh_views()

    def batch_repeat_interleave(self, repeats: int) -> None:
        self.batch_select_indices(torch.arange(self.mask.shape[0], device=self.mask.device).repeat_interleave(repeats))

    # ------------------------------------------------------------- metadata
    def _implicit(self) -> dict:
        """Positions, ranks, validity and sinks of every token, derived from ``mask`` (cached)."""
        if self._metadata is None:
            heads = self.keys.shape[1]
            batch, seen = self.mask.shape
            ranks = (self.mask.long().cumsum(1) - 1).clamp(min=0)
            shape = (batch, heads, seen)
            self._metadata = {
                "positions": torch.arange(seen, device=self.device).expand(shape),
                "ranks": ranks[:, None].expand(shape),
                "valid": self.mask[:, None].expand(shape),
                "sink": (self.mask & (ranks < self.policy.n_sink))[:, None].expand(shape),
                "valid_seen": self.mask.sum(1),
                "real_slots": [row.nonzero()[:, 0] for row in self.mask],
            }
        return self._metadata

    positions = property(lambda self: self._implicit()["positions"])
    ranks = property(lambda self: self._implicit()["ranks"])
    valid = property(lambda self: self._implicit()["valid"])
    sink = property(lambda self: self._implicit()["sink"])
    valid_seen = property(lambda self: self._implicit()["valid_seen"])

    def mark_new_tokens(self, new_valid: torch.Tensor) -> None:
        self.mask[:, -new_valid.shape[1]:] = new_valid.to(self.mask.device)
        self._metadata = None

    @property
    def padded(self) -> bool:
        """Does ``mask`` hold any padding? (False: slot == position == rank.)"""
        return self.mask is not None and not bool(self.mask.all())

    # ------------------------------------------------------------- sketching
    def enforce_budget(self) -> None:
        """Nothing is evicted: sketch each sequence's whole groups of real tokens not sketched yet."""
        if self.defer_eviction or not self.is_initialized:
            return
        if not self.padded:  # every slot is a real token: the slots to sketch are a range
            for row, sketch in enumerate(self.sketches):
                ready = (self.seen - sketch.count) // sketch.group * sketch.group
                if ready:
                    rows = slice(sketch.count, sketch.count + ready)
                    sketch.add(self.tier.keys[row:row + 1, :, rows].to(self.device),
                               self.tier.values[row:row + 1, :, rows].to(self.device))
            return
        for row, (sketch, slots) in enumerate(zip(self.sketches, self._implicit()["real_slots"])):
            ready = (len(slots) - sketch.count) // sketch.group * sketch.group
            if ready:
                chosen = slots[sketch.count:sketch.count + ready].to(self.tier.keys.device)
                sketch.add(self.tier.keys[row:row + 1, :, chosen].to(self.device), self.tier.values[row:row + 1, :, chosen].to(self.device))

    def sketch_logits(self, query: torch.Tensor, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Approximate logits ``[batch, q_heads, seen]`` of one query token per head at the sketched
        slots (-inf elsewhere), and the ``[batch, seen]`` mask of those slots."""
        batch, q_heads = query.shape[:2]
        logits = torch.full((batch, q_heads, self.seen), float("-inf"), device=query.device)
        sketched = torch.zeros(batch, self.seen, dtype=torch.bool, device=query.device)
        for row, (sketch, slots) in enumerate(zip(self.sketches, self._implicit()["real_slots"])):
            if sketch.count:
                slots = slots[: sketch.count]
                logits[row, :, slots] = sketch.logits(query[row:row + 1], scaling)[0]
                sketched[row, slots] = True
        return logits, sketched

    def sketched_prefix_logits(self, query: torch.Tensor, scaling: float) -> torch.Tensor | None:
        """Without padding, when every sequence has sketched the same ``count`` tokens: the sketch
        logits ``[batch, q_heads, count]`` of slots ``0..count`` (the sketched slots; the rest,
        ``count..seen``, are the unsketched ones), a new tensor the caller may overwrite; else None.
        The same numbers :meth:`sketch_logits` puts at those slots, without its ``seen``-long
        -inf tensor, mask and scatter."""
        if self.padded or not self.sketches:
            return None
        count = self.sketches[0].count
        if count == 0 or any(sketch.count != count for sketch in self.sketches):
            return None
        if len(self.sketches) == 1:
            return self.sketches[0].logits(query, scaling)
        return torch.cat([sketch.logits(query[row:row + 1], scaling) for row, sketch in enumerate(self.sketches)])

    def unread_mass(self, weights: torch.Tensor) -> torch.Tensor:
        """The weight of the sketched tokens a decode step does not read, summed per sketch group:
        ``weights`` ``exp(sketch logit - peak)`` ``[batch, q_heads, n]`` by slot (``n`` covers every
        sketched slot), 0 at the tokens read -> ``[batch, q_heads, groups]`` (0 past a row's groups)."""
        groups = max(sketch.count // sketch.group for sketch in self.sketches)
        batch, q_heads = weights.shape[:2]
        if groups == 0:
            return weights.new_zeros(batch, q_heads, 0)
        if batch == 1 and not self.padded:  # slot == rank: the sketched tokens are slots 0..count
            return self._group_sums(weights[:, :, : self.sketches[0].count])
        mass = weights.new_zeros(batch, q_heads, groups)
        for row, (sketch, slots) in enumerate(zip(self.sketches, self._implicit()["real_slots"])):
            if sketch.count:
                count = sketch.count // sketch.group
                mass[row:row + 1, :, :count] = self._group_sums(weights[row:row + 1, :, slots[: sketch.count]])
        return mass

    def unread_rows(self, mass: torch.Tensor, peak: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The sketched tokens a decode step does not read, as one extra attention row per sketch
        group (RetroInfer's estimated middle tier, arXiv:2505.02922).

        ``mass``: :meth:`unread_mass` (overwritten); ``peak`` ``[batch, q_heads, 1]`` the logit the
        weights are relative to. A group's row has the group's mean value and the logit ``log(mass)
        + peak``, so in the softmax it weighs what those tokens would weigh together, each
        contributing the group's mean value. Returns ``(logits [batch, q_heads, groups], values
        [batch, kv_heads, groups, dim])`` (a row without sketch, or with fewer groups, gets -inf), or
        None when every sketched token is read (or nothing is sketched).
        """
        if mass.shape[-1] == 0 or not bool(mass.any()):  # attention over the rows alone
            return None
        if mass.shape[0] == 1 and not self.padded:
            means = self.sketches[0].value_means()
        else:
            means = mass.new_zeros(mass.shape[0], self.keys.shape[1], mass.shape[-1], self.keys.shape[-1])
            for row, sketch in enumerate(self.sketches):
                if sketch.count:
                    means[row, :, : sketch.count // sketch.group] = sketch.value_means()[0]
        return mass.log_() + peak, means

    def _group_sums(self, weights: torch.Tensor) -> torch.Tensor:
        """``[batch, q_heads, groups * group]`` -> ``[batch, q_heads, groups]``."""
        return weights.view(*weights.shape[:2], -1, self.sketches[0].group).sum(-1)

    def unsketched_slots(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``[batch, 1, n]`` slots of each sequence's real tokens not sketched yet (padded, ``ok`` False)."""
        rest = [slots[sketch.count:] for sketch, slots in zip(self.sketches, self._implicit()["real_slots"])]
        width = max(len(r) for r in rest)
        index = torch.zeros(len(rest), 1, width, dtype=torch.long, device=self.device)
        ok = torch.zeros(len(rest), 1, width, dtype=torch.bool, device=self.device)
        for row, slots in enumerate(rest):
            index[row, 0, : len(slots)], ok[row, 0, : len(slots)] = slots, True
        return index, ok

    # ------------------------------------------------------------- accounting
    @property
    def kept(self) -> int:
        return self.seen

    @property
    def kv_bytes(self) -> int:
        """Resident bytes: the sketch and the padding mask (the exact rows are in the tier)."""
        return sum(s.nbytes for s in self.sketches) + (0 if self.mask is None else self.mask.nbytes)

    @property
    def kv_bytes_16bit(self) -> int:
        return self.kv_bytes  # codes and fp16 scales: the same in a 16-bit run

    @property
    def tier_bytes(self) -> int:
        return 0 if self.tier is None else self.tier.nbytes
