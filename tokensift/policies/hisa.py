"""HISA: hierarchical (block, then token) top-k selection."""

from dataclasses import dataclass

import torch

from tokensift.errors import TokensiftError
from tokensift.policies.registry import register
from tokensift.policies.sparse_base import SparsePolicy
from tokensift.selection import forced_mask, gather_attend, gather_rows, head_logits, top_k


@register
@dataclass
class HISA(SparsePolicy):
    """Two-stage selection per KV head. Token score: one indexer score per token and KV head
    (as in the DSA indexer HISA accelerates): each query head's softmax of q·k over the
    candidates, summed over the KV head's query group (``group_score="softmax"``, TokenSelect's
    soft vote; per-head normalization matters: raw q·k maxima let one head dominate), or the
    largest q·k in the group (``"max"``). Stage 1: each
    block of ``block`` consecutive stored tokens is represented by its mean key (over real
    tokens; complete blocks are pooled once and kept in ``layer.state``); the ``keep_blocks``
    blocks with the best pooled score (q · mean key + log of the block's real-token count,
    scored across the group the same way) are kept (blocks holding protected tokens always; default
    ``ceil(4 k / block)``, i.e. about four candidates per token read).
    Stage 2: exact token top-``k`` inside the kept blocks. With every block kept it returns
    the same set as flat top-``k`` over the token score (:meth:`flat_select`).

    "HISA: Efficient Hierarchical Indexing for Fine-Grained Sparse Attention".

    Parameters
    ----------
    block : int, default 64
        Consecutive stored tokens pooled into one block.
    keep_blocks : int or None, default None
        Blocks kept by stage 1 (None: ``ceil(4 k / block)``); they must hold at least ``k`` tokens.
    group_score : str, default "softmax"
        How a KV head's query group scores a token: ``softmax`` (summed per-head softmax) or
        ``max`` (largest q·k).

    Plus the parameters of :class:`~tokensift.policies.sparse_base.SparsePolicy` (``k``, the base policy).
    """

    name = "hisa"
    paper = "HISA: Efficient Hierarchical Indexing for Fine-Grained Sparse Attention"
    block: int = 64
    keep_blocks: int | None = None
    group_score: str = "softmax"

    def validate_method(self) -> None:
        if self.group_score not in ("softmax", "max"):
            raise TokensiftError(f"hisa: group_score must be 'softmax' or 'max' (got '{self.group_score}')")
        if self.keep_blocks is None:
            self.keep_blocks = -(-4 * self.k // self.block)
        if self.block < 1 or self.keep_blocks < 1:
            raise TokensiftError(f"hisa: block and keep_blocks must be >= 1 (got {self.block}, {self.keep_blocks})")
        if self.block * self.keep_blocks < self.k:
            raise TokensiftError(
                f"hisa: keep_blocks {self.keep_blocks} x block {self.block} < k {self.k}: the kept blocks cannot hold k tokens"
            )

    def read(self, layer, query, key, value, query_valid, scaling):
        index, ok = self.select(layer, query, key, scaling)
        return gather_attend(query, key, value, index, ok, scaling, query_valid)

    # ------------------------------------------------------------------ selection
    def group_scores(self, logits: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        """``[batch, kv_heads, group, n]`` logits -> ``[batch, kv_heads, n]`` indexer scores."""
        logits = logits.float().masked_fill(~allowed[:, :, None], float("-inf"))
        if self.group_score == "max":
            return logits.amax(2)
        return torch.softmax(logits, dim=-1).nan_to_num_(0.0).sum(2)

    def flat_select(self, layer, query, key, scaling):
        """Reference: flat top-``k`` over the token score (all blocks kept)."""
        batch, q_heads, _, dim = query.shape
        kv_heads = key.shape[1]
        logits = head_logits(query, key, scaling).view(batch, kv_heads, q_heads // kv_heads, -1)
        return top_k(self.group_scores(logits, layer.valid), self.k, forced_mask(layer), layer.valid)

    def select(self, layer, query, key, scaling):
        batch, q_heads, _, dim = query.shape
        kv_heads, kept = key.shape[1], key.shape[2]
        groups = q_heads // kv_heads
        n_blocks = -(-kept // self.block)
        forced, valid = forced_mask(layer), layer.valid
        means, counts = self.pooled_keys(layer, key, n_blocks)
        # a block's attention mass ~ count * exp(q · mean key): score blocks like tokens
        block_logits = head_logits(query, means, scaling).view(batch, kv_heads, groups, n_blocks)
        block_logits = block_logits + counts.clamp(min=1).log()[:, :, None]
        block_scores = self.group_scores(block_logits, counts > 0)
        block_forced = _blockwise_any(forced, self.block, n_blocks)
        blocks, _ = top_k(block_scores, self.keep_blocks, block_forced, counts > 0)
        offsets = torch.arange(self.block, device=key.device)
        candidates = (blocks[..., None] * self.block + offsets).reshape(batch, kv_heads, -1)
        in_range = candidates < kept
        candidates = candidates.clamp(max=kept - 1)
        allowed = valid.gather(2, candidates) & in_range
        cand_keys = gather_rows(key, candidates)
        q = query.reshape(batch, kv_heads, groups, dim)
        logits = torch.matmul(q, cand_keys.transpose(-1, -2)) * scaling
        scores = self.group_scores(logits, allowed)
        chosen, ok = top_k(scores, self.k, forced.gather(2, candidates) & in_range, allowed)
        index = candidates.gather(2, chosen)
        index, order = index.sort(dim=-1)
        return index, ok.gather(2, order)

    def pooled_keys(self, layer, key, n_blocks: int):
        """Mean key of every block over its real tokens ``[batch, kv_heads, n_blocks, dim]`` and counts."""
        batch, kv_heads, kept, dim = key.shape
        full = kept // self.block
        cached = layer.state.get("hisa_pool")
        reusable = (
            cached is not None and kept == layer.seen and cached["block"] == self.block
            and cached["sums"].shape[:2] == (batch, kv_heads) and cached["full"] <= full
        )
        start = cached["full"] if reusable else 0
        span = slice(start * self.block, full * self.block)
        valid = layer.valid[..., span, None].to(key.dtype)
        sums = (key[:, :, span] * valid).reshape(batch, kv_heads, full - start, self.block, dim).sum(3)
        counts = valid.reshape(batch, kv_heads, full - start, self.block).sum(3)
        if reusable:
            sums, counts = torch.cat([cached["sums"], sums], 2), torch.cat([cached["counts"], counts], 2)
        if kept == layer.seen:
            layer.state["hisa_pool"] = {"sums": sums, "counts": counts, "full": full, "block": self.block}
        if n_blocks > full:  # the partial last block
            tail_valid = layer.valid[..., full * self.block:, None].to(key.dtype)
            sums = torch.cat([sums, (key[:, :, full * self.block:] * tail_valid).sum(2, keepdim=True)], 2)
            counts = torch.cat([counts, tail_valid.sum(2).view(batch, kv_heads, 1)], 2)
        return sums / counts.clamp(min=1)[..., None], counts


def _blockwise_any(mask: torch.Tensor, block: int, n_blocks: int) -> torch.Tensor:
    """``[batch, heads, n]`` bool -> ``[batch, heads, n_blocks]``: any True inside each block."""
    pad = n_blocks * block - mask.shape[-1]
    padded = torch.nn.functional.pad(mask, (0, pad))
    return padded.view(*mask.shape[:2], n_blocks, block).any(-1)
