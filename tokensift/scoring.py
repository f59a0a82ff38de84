"""Shared scorers: attention probabilities computed on demand, chunked over queries.

Nothing here materializes a full ``[queries, keys]`` attention matrix for a long prompt:
probabilities are computed for blocks of query rows and reduced at once.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

ROW_CHUNK = 256


@dataclass
class AttentionView:
    """The queries of one attention call and the keys they attended, per KV head.

    A key is visible to a query when it is valid (not padding) and its position is not
    after the query's position: this one rule covers causality, the compressed past and
    padding. Probabilities are averaged over the query heads that share a KV head.
    """

    query: torch.Tensor  # [batch, q_heads, q, dim], after RoPE
    keys: torch.Tensor  # [batch, kv_heads, kv, dim]
    key_valid: torch.Tensor  # [batch, kv_heads, kv] bool
    key_positions: torch.Tensor  # [batch, kv_heads, kv] long
    query_positions: torch.Tensor  # [q] long
    query_valid: torch.Tensor  # [batch, q] bool
    scaling: float
    memo: dict = field(default_factory=dict, repr=False)  # column sums, reused when a view is shared

    @property
    def num_queries(self) -> int:
        return self.query.shape[2]

    @property
    def groups(self) -> int:
        return self.query.shape[1] // self.keys.shape[1]

    def visible(self, rows: slice) -> torch.Tensor:
        """``[batch, kv_heads, rows, kv]`` bool: which keys each query row may see."""
        qpos = self.query_positions[rows]
        return self.key_valid[:, :, None, :] & (self.key_positions[:, :, None, :] <= qpos[None, None, :, None])

    def probs(self, rows: slice) -> torch.Tensor:
        """Softmax attention of query ``rows`` over all keys, ``[batch, kv_heads, rows, kv]``.

        Averaged over each KV head's query group; fp32.
        """
        batch, kv_heads, kv, dim = self.keys.shape
        query = self.query[:, :, rows].float()
        n_rows = query.shape[2]
        query = query.reshape(batch, kv_heads, self.groups * n_rows, dim)
        logits = torch.matmul(query, self.keys.float().transpose(-1, -2)) * self.scaling
        logits = logits.view(batch, kv_heads, self.groups, n_rows, kv)
        logits = logits.masked_fill(~self.visible(rows)[:, :, None], float("-inf"))
        probs = torch.softmax(logits, dim=-1).nan_to_num_(0.0)
        return probs.mean(dim=2)

    def column_sum(self, row_weights: torch.Tensor | None = None, rows: slice = slice(None)) -> torch.Tensor:
        """Attention each key received, summed over (weighted) valid query rows: ``[batch, kv_heads, kv]``."""
        start, stop, _ = rows.indices(self.num_queries)
        key = (start, stop, None if row_weights is None else row_weights.float().numpy().tobytes())
        if key not in self.memo:
            self.memo[key] = self._column_sum(row_weights, start, stop)
        return self.memo[key].clone()

    def _column_sum(self, row_weights: torch.Tensor | None, start: int, stop: int) -> torch.Tensor:
        total = torch.zeros(self.keys.shape[:3], dtype=torch.float32, device=self.keys.device)
        for begin in range(start, stop, ROW_CHUNK):
            chunk = slice(begin, min(begin + ROW_CHUNK, stop))
            weights = self.query_valid[:, chunk].float()  # [batch, rows]
            if row_weights is not None:
                weights = weights * row_weights[chunk].to(weights)
            total += torch.einsum("bhrk,br->bhk", self.probs(chunk), weights)
        return total

    def last_rows(self, count: int) -> slice:
        """The slice of the last ``count`` query rows."""
        return slice(max(self.num_queries - count, 0), self.num_queries)


def pad_to(scores: torch.Tensor | None, length: int, like: torch.Tensor) -> torch.Tensor:
    """Extend ``[batch, heads, n]`` running scores with zeros for newly appended tokens."""
    if scores is None:
        return torch.zeros(like.shape[:3], dtype=torch.float32, device=like.device)
    missing = length - scores.shape[-1]
    if missing <= 0:
        return scores
    return torch.nn.functional.pad(scores, (0, missing))


def pool_along_tokens(scores: torch.Tensor, kernel: int, mode: str = "max") -> torch.Tensor:
    """Smooth ``[batch, heads, n]`` scores along the token axis (SnapKV's clustering)."""
    if kernel <= 1:
        return scores
    batch, heads, n = scores.shape
    flat = scores.reshape(batch * heads, 1, n)
    pad = kernel // 2
    if mode == "max":
        pooled = torch.nn.functional.max_pool1d(flat, kernel, stride=1, padding=pad)
    else:
        pooled = torch.nn.functional.avg_pool1d(flat, kernel, stride=1, padding=pad, count_include_pad=False)
    return pooled[..., :n].reshape(batch, heads, n)
