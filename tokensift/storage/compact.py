"""A selecting layer that holds its K/V in a compact form between forwards.

During a forward (from ``update`` to the end of ``enforce_budget``) the layer is *expanded*:
``keys``/``values`` are ordinary ``[batch, kv_heads, slots, dim]`` tensors, so attention,
policies and selection work unchanged. At the end of the forward it *packs* them into the
variant's own storage and drops the expanded tensors (``keys``/``values`` become None), so
what is held between forwards — and counted by ``kv_bytes`` — is only the packed form.
Per-token metadata (positions, ranks, valid, sink, token_state) stays in the slot layout.
"""

from __future__ import annotations

import torch

from tokensift.cache import SelectingLayer


class CompactLayer(SelectingLayer):
    """Base of storage variants; subclasses implement ``_pack``, ``_unpack``, ``packed_bytes``."""

    def __init__(self, layer_idx: int, num_layers: int, policy):
        super().__init__(layer_idx, num_layers, policy)
        self.packed = False
        self.shape: tuple[int, int, int] | None = None  # batch, kv heads, head dim
        self.itemsize = 4

    # ----------------------------------------------------------- subclass hooks
    def _pack(self) -> None:
        """Move ``keys``/``values`` into compact storage (may decide to keep them as they are)."""
        raise NotImplementedError

    def _unpack(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Rebuild ``[batch, kv_heads, slots, dim]`` K/V from compact storage."""
        raise NotImplementedError

    def packed_bytes(self) -> int:
        """Bytes of the compact storage."""
        raise NotImplementedError

    # -------------------------------------------------------- expand / compact
    def expand(self) -> None:
        if self.packed:
            self.keys, self.values = self._unpack()
            self.packed = False

    def compact(self) -> None:
        if not self.packed and self.is_initialized:
            self._pack()
            if self.packed:
                self.store.drop_buffers()  # the expanded K/V's append buffers would stay alive, uncounted

    def _expanded(self, method, *args):
        """Run ``method`` on the expanded layer, then pack again."""
        self.expand()
        result = method(*args)
        self.compact()
        return result

    # ----------------------------------------------------------- engine hooks
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self.shape = (key_states.shape[0], key_states.shape[1], key_states.shape[-1])
        self.itemsize = key_states.element_size()

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        self.expand()
        return super().update(key_states, value_states, *args, **kwargs)

    def enforce_budget(self) -> None:
        super().enforce_budget()
        self.compact()

    def crop(self, tokens_to_remove: int) -> None:
        self._expanded(super().crop, tokens_to_remove)

    def keep_new_tokens(self, new: int, indices) -> None:
        self._expanded(super().keep_new_tokens, new, indices)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._expanded(super().batch_select_indices, indices)
        self.shape = (self.positions.shape[0], *self.shape[1:])

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._expanded(super().batch_repeat_interleave, repeats)
        self.shape = (self.positions.shape[0], *self.shape[1:])

    def reset(self) -> None:
        super().reset()
        self.packed = False

    # -------------------------------------------------------------- accounting
    @property
    def kept(self) -> int:
        return 0 if self.positions is None else self.positions.shape[-1]

    @property
    def kv_bytes(self) -> int:
        if self.packed:
            return self.packed_bytes()
        return 0 if self.keys is None else self.keys.nbytes + self.values.nbytes

    @property
    def element_size(self) -> int:
        return self.itemsize

    @property
    def kv_bytes_full(self) -> int:
        if self.shape is None:
            return 0
        batch, heads, dim = self.shape
        return 2 * batch * heads * self.seen * dim * self.itemsize
