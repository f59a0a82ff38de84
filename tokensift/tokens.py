"""The per-token state of one cache layer, in one small store.

Every tensor of a :class:`TokenStore` is ``[batch, kv_heads, tokens, ...]`` and they stay in
step along the token axis (dimension 2): the K/V, the token metadata the engine keeps (true
positions, ranks, validity, sinks) and a policy's per-token statistics. The store does the
five things a layer needs with them: append (with spare room, so decode steps do not copy the
layer), gather (eviction, reordering), truncate (rollback), stack (several sequences into one
batch) and fork (a second layer sharing the same tokens without copying them).
"""

from __future__ import annotations

import torch


class TokenStore:
    """Named per-token tensors, kept in step along the token axis.

    ``tensors`` holds the engine's own (``keys``, ``values``, ``positions``...), ``statistics``
    a policy's (H2O's accumulated attention, TOVA's last scores...). A statistic may lag behind
    by the newest tokens until the policy's next observation pads it; every other operation
    keeps all of them in step.

    Append buffers: :meth:`append` may allocate spare slots after the tokens; the next append
    writes only its own tokens there while the stored tensor is still a prefix of that buffer.
    Stored tensors are otherwise never written in place by the store.
    """

    def __init__(self, tensors: dict[str, torch.Tensor | None] | None = None,
                 statistics: dict[str, torch.Tensor] | None = None):
        self.tensors: dict[str, torch.Tensor | None] = dict(tensors or {})
        self.statistics: dict[str, torch.Tensor] = dict(statistics or {})
        self.buffers: dict[str, torch.Tensor] = {}
        self.frozen = 0  # tokens shared with a fork: never overwritten in place

    # ------------------------------------------------------------------ access
    def __getitem__(self, name: str) -> torch.Tensor | None:
        return self.tensors.get(name)

    def __setitem__(self, name: str, tensor: torch.Tensor | None) -> None:
        self.tensors[name] = tensor

    def clear(self) -> None:
        """Forget every tensor and buffer."""
        self.tensors = {name: None for name in self.tensors}
        self.statistics = {}
        self.buffers = {}
        self.frozen = 0

    def allocated(self, name: str) -> torch.Tensor | None:
        """The tensor holding ``name``'s memory: its append buffer (spare room included), or itself."""
        tensor, buffer = self.tensors.get(name), self.buffers.get(name)
        return buffer if tensor is not None and is_prefix_view(tensor, buffer) else tensor

    def drop_buffers(self) -> None:
        """Forget the append buffers (their tensors stay; the next append copies)."""
        self.buffers.clear()

    # ------------------------------------------------------------------ append
    def append(self, name: str, new: torch.Tensor, spare: int = 0) -> torch.Tensor:
        """``cat([self[name], new])`` along the token axis, stored and returned.

        Written into the append buffer when the stored tensor is still a prefix of it and the
        tokens fit (and none of the overwritten slots is shared with a fork); otherwise a new
        tensor, with ``spare`` free slots after it when ``spare`` > 0.
        """
        current, buffer = self.tensors[name], self.buffers.get(name)
        held, total = current.shape[2], current.shape[2] + new.shape[2]
        reusable = is_prefix_view(current, buffer) and total <= buffer.shape[2] and held >= self.frozen
        if not reusable:
            if not spare:
                self.buffers.pop(name, None)
                if held == 0 and new.is_contiguous():
                    self.tensors[name] = new  # nothing held yet: take the block as is
                else:
                    self.tensors[name] = torch.cat([current, new], dim=2)
                return self.tensors[name]
            buffer = current.new_empty(*current.shape[:2], total + spare, *current.shape[3:])
            buffer[:, :, :held].copy_(current)
            self.buffers[name] = buffer
        buffer[:, :, held:total].copy_(new)
        self.tensors[name] = buffer[:, :, :total]
        return self.tensors[name]

    def replace_tail(self, name: str, past: int, tail: torch.Tensor) -> None:
        """``self[name]`` = its first ``past`` tokens followed by ``tail``: written in place into
        the append buffer when there is one (the past is not copied), else concatenated."""
        tensor, count = self.tensors[name], tail.shape[2]
        if is_prefix_view(tensor, self.buffers.get(name)) and past >= self.frozen:
            tensor[:, :, past:past + count].copy_(tail)
            self.tensors[name] = tensor[:, :, : past + count]
        else:
            self.tensors[name] = torch.cat([tensor[:, :, :past], tail], dim=2)

    # ------------------------------------------------------ gather and truncate
    def gather(self, index: torch.Tensor | slice) -> None:
        """Keep only ``index`` of every tensor: a slice of the token axis, or ``[batch, heads, n]``
        token indices (per sequence and head)."""
        self.tensors = {name: _take(tensor, index) for name, tensor in self.tensors.items()}
        self.statistics = {name: _take(tensor, index) for name, tensor in self.statistics.items()}

    def truncate(self, length: int) -> None:
        """Keep the first ``length`` tokens (views: the next append reuses the buffers)."""
        self.gather(slice(0, length))

    # ------------------------------------------------------------- batch axis
    def select_rows(self, rows: torch.Tensor) -> None:
        """Keep the sequences ``rows`` (in that order; repeats allowed)."""
        self.tensors = {n: None if t is None else t[rows] for n, t in self.tensors.items()}
        self.statistics = {n: t[rows] for n, t in self.statistics.items()}
        self.buffers = {}

    def row(self, row: int, slots: torch.Tensor | None = None) -> TokenStore:
        """A new store with sequence ``row`` alone (only its token ``slots`` when given)."""
        def take(tensor):
            part = tensor[row:row + 1]
            return part if slots is None else part.index_select(2, slots)

        return TokenStore({n: None if t is None else take(t) for n, t in self.tensors.items()},
                          {n: take(t) for n, t in self.statistics.items()})

    @staticmethod
    def stack(stores: list[TokenStore], pad_left: bool = False) -> TokenStore:
        """One store holding the sequences of ``stores`` one after another on the batch axis.

        Shorter ones are padded to the longest with zero slots (zero K/V, position 0, not valid,
        not a sink): on the right, or on the left with ``pad_left``. A statistic missing from
        some store is zero there.
        """
        longest = max(store.length for store in stores)
        names = [name for name, tensor in stores[0].tensors.items() if tensor is not None]
        statistics = list(dict.fromkeys(name for store in stores for name in store.statistics))

        def stacked(parts: list[torch.Tensor]) -> torch.Tensor:
            return torch.cat([_pad(part, longest, pad_left) for part in parts])

        def statistic(store: TokenStore, name: str) -> torch.Tensor:
            if name in store.statistics:
                return store.statistics[name]
            template = next(s.statistics[name] for s in stores if name in s.statistics)
            batch = store.tensors[names[0]].shape[0]
            return template.new_zeros(batch, template.shape[1], store.length, *template.shape[3:])

        tensors = {name: stacked([store.tensors[name] for store in stores]) for name in names}
        return TokenStore(tensors, {name: stacked([statistic(s, name) for s in stores]) for name in statistics})

    def fork(self) -> TokenStore:
        """A second store holding the same tokens without copying them.

        Neither store overwrites the shared slots afterwards: the fork starts without buffers,
        and this store stops writing in place below its current length.
        """
        self.frozen = self.length
        fork = TokenStore(self.tensors, self.statistics)
        fork.frozen = self.length
        return fork

    # ------------------------------------------------------------- accounting
    @property
    def length(self) -> int:
        """Tokens held (the token axis of the first tensor held)."""
        for tensor in self.tensors.values():
            if tensor is not None:
                return tensor.shape[2]
        return 0


def is_prefix_view(tensor: torch.Tensor, buffer: torch.Tensor | None) -> bool:
    """Whether ``tensor`` is ``buffer[:, :, :n]`` for some ``n`` (same storage start and strides)."""
    return (
        buffer is not None and tensor.data_ptr() == buffer.data_ptr() and tensor.stride() == buffer.stride()
        and tensor.shape[:2] == buffer.shape[:2] and tensor.shape[3:] == buffer.shape[3:]
    )


def _take(tensor: torch.Tensor | None, index: torch.Tensor | slice) -> torch.Tensor | None:
    """``index`` of one tensor's token axis; a prefix slice stays a view, any other slice is copied."""
    if tensor is None:
        return None
    if isinstance(index, slice):
        part = tensor[:, :, index]
        return part if index.start in (None, 0) else part.contiguous()
    idx = index if tensor.dim() == 3 else index[..., None].expand(-1, -1, -1, tensor.shape[-1])
    return tensor.gather(2, idx)


def _pad(tensor: torch.Tensor, length: int, left: bool) -> torch.Tensor:
    missing = length - tensor.shape[2]
    if not missing:
        return tensor
    zeros = _zeros_like_tokens(tensor, missing)
    return torch.cat([zeros, tensor] if left else [tensor, zeros], dim=2)


def _zeros_like_tokens(tensor: torch.Tensor, count: int) -> torch.Tensor:
    """Zeros shaped like ``tensor`` with ``count`` tokens."""
    return tensor.new_zeros(*tensor.shape[:2], count, *tensor.shape[3:])
