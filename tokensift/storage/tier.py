"""The second tier: exact K/V rows kept outside the memory the model computes in.

``file``: a memory-mapped file (created in a folder, then unlinked, so nothing is left behind
when the cache goes away). Its pages belong to the operating system's page cache: they count
in the process's RSS while touched, but the kernel may write them out and drop them under
memory pressure, as it does for any file. ``host``: ordinary CPU memory; it is outside the
model's memory only when the model runs on an accelerator (ShadowKV and InfiniGen keep their
second tier in host memory).

Rows ``[0, length)`` of ``keys``/``values`` ``[batch, heads, capacity, dim]`` are in use; reads
gather only the rows asked for.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

from tokensift.errors import TokensiftError

KINDS = ("file", "host")


def check_folder(folder: Path) -> None:
    """One-line error unless a tier file can be created in ``folder``."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        raise TokensiftError(f"tier folder {folder} cannot be written: {error.strerror or error}") from None


def _file_tensor(folder: Path, numel: int, dtype: torch.dtype) -> torch.Tensor:
    """A 1-D tensor of ``numel`` elements backed by a new (already unlinked) file in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    handle, path = tempfile.mkstemp(prefix="kv-tier-", dir=folder)
    try:
        os.ftruncate(handle, numel * torch.empty(0, dtype=dtype).element_size())
        return torch.from_file(path, shared=True, size=numel, dtype=dtype)
    finally:
        os.close(handle)
        os.unlink(path)


def _allocate(kind: str, folder: Path, shape: tuple[int, int, int, int], dtype: torch.dtype) -> torch.Tensor:
    numel = shape[0] * shape[1] * shape[2] * shape[3]
    if kind == "file":
        return _file_tensor(folder, numel, dtype).view(shape)
    return torch.empty(shape, dtype=dtype, pin_memory=torch.cuda.is_available())


class SecondTier:
    """Exact K/V rows of one layer, in a file map or host memory."""

    def __init__(self, kind: str, folder: Path, shape: tuple[int, int, int, int], dtype: torch.dtype):
        self.kind, self.folder = kind, folder
        batch, heads, capacity, dim = shape
        self.keys, self.values = (_allocate(kind, folder, shape, dtype) for _ in range(2))
        self.length = 0

    @property
    def capacity(self) -> int:
        return self.keys.shape[2]

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes

    def grown(self, needed: int) -> SecondTier:
        """This tier, or a larger copy when ``needed`` rows do not fit."""
        if needed <= self.capacity:
            return self
        batch, heads, _, dim = self.keys.shape
        bigger = SecondTier(self.kind, self.folder, (batch, heads, needed + needed // 8, dim), self.keys.dtype)
        bigger.write(0, *self.view(self.length))
        return bigger

    def write(self, start: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Rows ``[start, start + n)`` from ``[batch, heads, n, dim]`` K/V (any device)."""
        end = start + keys.shape[2]
        self.keys[:, :, start:end] = keys.to(self.keys.device)
        self.values[:, :, start:end] = values.to(self.values.device)
        self.length = max(self.length, end)

    def view(self, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The first ``length`` rows, as views (nothing read yet)."""
        return self.keys[:, :, :length], self.values[:, :, :length]

    def keep_rows(self, start: int, rows: torch.Tensor) -> None:
        """Rows ``start + rows`` (in order) move to ``start..``; the rest after ``start`` is dropped."""
        index = (start + rows).to(self.keys.device)
        count = int(rows.numel())
        for tensor in (self.keys, self.values):
            tensor[:, :, start:start + count] = tensor.index_select(2, index)
        self.length = start + count

    def select_batch(self, rows: torch.Tensor) -> SecondTier:
        """A new tier holding batch rows ``rows`` (beam reorder, repeat)."""
        rows = rows.to(self.keys.device)
        batch, heads, capacity, dim = self.keys.shape
        other = SecondTier(self.kind, self.folder, (int(rows.numel()), heads, capacity, dim), self.keys.dtype)
        other.write(0, self.keys[rows, :, : self.length], self.values[rows, :, : self.length])
        return other
