"""Per-head variable-length storage: each (sequence, KV head) holds its own number of tokens.

Packed form: ``store_keys``/``store_values`` ``[total, dim]``, the real tokens of every
(sequence, head) concatenated in slot order (boolean-mask indexing with ``valid``); nothing is
held for empty slots. Slots run to the longest head; a shorter head's extra slots are
invalid. Attention runs head by head over that head's own tokens (no padding, no mask beyond
causality among the new tokens).
"""

from __future__ import annotations

import torch

from tokensift.storage.compact import CompactLayer


class VarlenLayer(CompactLayer):
    """Selection keeps ``budget x kv_heads`` tokens per sequence, split across heads by the policy."""

    store_keys: torch.Tensor | None = None
    store_values: torch.Tensor | None = None

    # ----------------------------------------------------------------- storage
    def _pack(self) -> None:
        if not self.compressed:
            return  # plain layers hold exactly what a full cache would
        self.store_keys = self.keys[self.valid].contiguous()
        self.store_values = self.values[self.valid].contiguous()
        self.keys = self.values = None
        self.packed = True

    def _unpack(self) -> tuple[torch.Tensor, torch.Tensor]:
        batch, heads, dim = self.shape
        slots = self.valid.shape[-1]
        keys = self.store_keys.new_zeros(batch, heads, slots, dim)
        values = self.store_values.new_zeros(batch, heads, slots, dim)
        keys[self.valid] = self.store_keys
        values[self.valid] = self.store_values
        self.store_keys = self.store_values = None
        return keys, values

    def packed_bytes(self) -> int:
        return self.store_keys.nbytes + self.store_values.nbytes

    @property
    def kv_bytes(self) -> int:
        if self.packed or not self.compressed:
            return super().kv_bytes
        return 2 * int(self.valid.sum()) * self.shape[2] * self.itemsize  # what packing will hold

    def head_lengths(self) -> torch.Tensor:
        """``[batch, kv_heads]`` tokens held by each head."""
        return self.valid.sum(-1)

    # --------------------------------------------------------------- selection
    def enforce_budget(self) -> None:
        """Cut back when a sequence holds ``(budget + interval) x kv_heads`` tokens (per layer)."""
        if not self.defer_eviction:
            budget = self.policy.layer_budget(self.depth, self.depths, int(self.valid_seen.max()))
            heads = self.valid.shape[1]
            held = int(self.valid.sum(dim=(1, 2)).max()) if self.compressed else self.kept * heads
            if budget is not None and held >= (budget + self.policy.interval) * heads:
                self.select(budget)
        self.compact()

    def select(self, budget: int) -> None:
        """Keep ``budget x kv_heads`` tokens per sequence, split across heads by the policy
        (:meth:`~tokensift.policies.adakv.AdaKV.keep_across_heads`)."""
        keep = self.policy.keep_across_heads(self, budget)
        self._compact_slots(keep)
        self.compressed = True

    def _compact_slots(self, keep: torch.Tensor) -> None:
        """Move each head's kept tokens to its first slots (order kept); the rest become invalid."""
        counts = keep.sum(-1)
        slots = max(int(counts.max()), 1)
        order = (~keep).to(torch.int8).sort(dim=-1, stable=True).indices[..., :slots]
        self._gather_tokens(order)
        filled = torch.arange(slots, device=counts.device) < counts[..., None]
        self.valid = self.valid & filled
        self.sink = self.sink & filled

    # --------------------------------------------------------------- attention
    def attend(self, query, key, value, query_valid: torch.Tensor, scaling: float, new_block=None) -> torch.Tensor:
        """Attention head by head over each head's own tokens; ``[batch, q, heads, dim]``."""
        batch, heads = key.shape[:2]
        groups = query.shape[1] // heads
        mask = self.visibility(query_valid, new_block)
        out = query.new_empty(query.shape)
        for b in range(batch):
            for h in range(heads):
                held = self.valid[b, h] | _new_slots(self.valid.shape[-1], query.shape[2], key.device)
                k, v = key[b, h][held], value[b, h][held]
                m = None if mask is None else mask[b, h][:, held]
                q = query[b, h * groups:(h + 1) * groups]
                out[b, h * groups:(h + 1) * groups] = torch.nn.functional.scaled_dot_product_attention(
                    q, k[None], v[None], attn_mask=None if m is None else m[None], scale=scaling
                )
        return out.transpose(1, 2).contiguous()


def _new_slots(slots: int, new: int, device) -> torch.Tensor:
    """Bool ``[slots]``: True for the ``new`` last slots (the tokens of this forward)."""
    flags = torch.zeros(slots, dtype=torch.bool, device=device)
    flags[slots - new:] = True
    return flags
