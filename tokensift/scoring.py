"""Shared scorers: attention probabilities computed on demand, chunked over queries.

Nothing here materializes a full ``[queries, keys]`` attention matrix for a long prompt:
probabilities are computed for blocks of query rows and reduced at once.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

ROW_CHUNK = 256
# rows weighted below this fraction of the heaviest row add < 1e-9 to any score: skipped
NEGLIGIBLE_WEIGHT = 1e-9


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

    def visible(self, rows: slice, reach: int | None = None) -> torch.Tensor:
        """``[batch, kv_heads, rows, kv]`` bool: which keys (of the first ``reach``) each query row may see."""
        qpos = self.query_positions[rows]
        valid, positions = self.key_valid[..., :reach], self.key_positions[..., :reach]
        return valid[:, :, None, :] & (positions[:, :, None, :] <= qpos[None, None, :, None])

    def reach(self, rows: slice) -> int:
        """How many leading keys any of ``rows`` can see; later keys get probability 0 (causal prefill)."""
        seen = self.key_valid & (self.key_positions <= self.query_positions[rows].max())
        seen = seen.flatten(0, 1).any(0).nonzero()
        return int(seen[-1]) + 1 if len(seen) else 0

    def probs(self, rows: slice, reach: int | None = None) -> torch.Tensor:
        """Softmax attention of query ``rows`` over the first ``reach`` keys (all by default),
        ``[batch, kv_heads, rows, reach]``. Averaged over each KV head's query group; fp32.
        """
        batch, kv_heads, _, dim = self.keys.shape
        keys = self.keys[:, :, :reach].float()
        query = self.query[:, :, rows].float() * self.scaling
        n_rows = query.shape[2]
        query = query.reshape(batch, kv_heads, self.groups * n_rows, dim)
        logits = torch.matmul(query, keys.transpose(-1, -2)).view(batch, kv_heads, self.groups, n_rows, keys.shape[2])
        start = self.all_visible_before(rows, keys.shape[2])
        hidden = ~self.visible(rows, keys.shape[2])[..., start:]
        logits[..., start:].masked_fill_(hidden[:, :, None], float("-inf"))
        return torch.softmax(logits, dim=-1).nan_to_num_(0.0).mean(dim=2)

    def all_visible_before(self, rows: slice, reach: int) -> int:
        """A key index before which every key is visible to every row (masking starts there)."""
        first = int(self.query_positions[rows].min())
        lead = min(reach, first + 1)
        if lead and bool(self.key_valid[..., :lead].all()) and int(self.key_positions[..., :lead].max()) <= first:
            return lead
        return 0

    def column_sum(self, row_weights: torch.Tensor | None = None, rows: slice = slice(None)) -> torch.Tensor:
        """Attention each key received, summed over (weighted) valid query rows: ``[batch, kv_heads, kv]``."""
        start, stop, _ = rows.indices(self.num_queries)
        key = (start, stop, None if row_weights is None else row_weights.float().cpu().numpy().tobytes())
        if key not in self.memo:
            self.memo[key] = self._column_sum(row_weights, start, stop)
        return self.memo[key].clone()

    def _column_sum(self, row_weights: torch.Tensor | None, start: int, stop: int) -> torch.Tensor:
        total = torch.zeros(self.keys.shape[:3], dtype=torch.float32, device=self.keys.device)
        floor = 0.0 if row_weights is None else float(row_weights[start:stop].max()) * NEGLIGIBLE_WEIGHT
        for begin in range(start, stop, ROW_CHUNK):
            chunk = slice(begin, min(begin + ROW_CHUNK, stop))
            weights = self.query_valid[:, chunk].float()  # [batch, rows]
            if row_weights is not None:
                if float(row_weights[chunk].max()) < floor:
                    continue  # e.g. A2SF's oldest rows: weight 0.99**2000 ~ 2e-9
                weights = weights * row_weights[chunk].to(weights)
            reach = self.reach(chunk)
            total[..., :reach] += torch.einsum("bhrk,br->bhk", self.probs(chunk, reach), weights)
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
