"""Tensor primitives of token selection: top-k with forced tokens, gathers, sparse attention.

Shared by the cache's eviction (:meth:`~tokensift.cache.SelectingLayer.select` keeps a layer's
best tokens with :func:`top_k`) and by the query-aware reading policies
(:mod:`tokensift.policies.sparse_base`): they score tokens, pick the top ``k`` per head with
protected tokens (sinks, recent window, the query's own token) forced in and padding forced
out, gather the chosen K/V rows (``index_select`` on a flat view) and run SDPA over them.

Selections that outlive a step or cross layers are stored as *positions* (true token
indices), and mapped back to each layer's storage with :func:`positions_to_indices`, so they
stay correct when an evicting base policy has dropped or reordered tokens.

Nothing here imports the cache: functions take a layer and read its public tensors
(``positions``, ``valid``, ``seen``, ``state``...).
"""

from __future__ import annotations

import math

import torch

NEG_INF = float("-inf")
POS_INF = float("inf")


# ------------------------------------------------------------------------ counters
def count(layer, what: str, n: int = 1) -> None:
    """Per-layer counters in ``layer.state["sparse"]`` (dense / sparse / fresh / reused reads)."""
    stats = layer.state.setdefault("sparse", {})
    stats[what] = stats.get(what, 0) + n


def read_stats(cache) -> dict[str, int]:
    """Counters summed over a cache's selecting layers."""
    total: dict[str, int] = {}
    for layer in cache.selecting_layers:
        for key, value in layer.state.get("sparse", {}).items():
            total[key] = total.get(key, 0) + value
    return total


# ------------------------------------------------------------------------ primitives
def head_logits(query: torch.Tensor, key: torch.Tensor, scaling: float) -> torch.Tensor:
    """``q·k * scaling`` of one query token per query head: ``[batch, q_heads, kv]`` (GQA, no copy)."""
    batch, q_heads, _, dim = query.shape
    kv_heads, length = key.shape[1], key.shape[2]
    q = query.reshape(batch, kv_heads, q_heads // kv_heads, dim)
    return torch.matmul(q, key.transpose(-1, -2)).reshape(batch, q_heads, length) * scaling


def to_query_heads(mask: torch.Tensor, q_heads: int) -> torch.Tensor:
    """``[batch, kv_heads, n]`` -> ``[batch, q_heads, n]`` (each KV head repeated over its group)."""
    return mask.repeat_interleave(q_heads // mask.shape[1], dim=1)


def group_reduce(scores: torch.Tensor, kv_heads: int, how: str = "sum") -> torch.Tensor:
    """``[batch, q_heads, n]`` -> ``[batch, kv_heads, n]`` over each KV head's query group."""
    batch, q_heads, n = scores.shape
    grouped = scores.view(batch, kv_heads, q_heads // kv_heads, n)
    return grouped.amax(2) if how == "max" else grouped.sum(2)


def forced_mask(layer) -> torch.Tensor:
    """``[batch, kv_heads, kept]`` bool: protected tokens (sinks, window) and the newest token."""
    forced = layer.protected_mask().clone()
    forced[..., -1] = True
    return forced


def top_k(scores: torch.Tensor, k: int, forced: torch.Tensor, allowed: torch.Tensor, stable: bool = False):
    """Indices ``[batch, heads, k]`` (sorted) of the best ``scores``, forced first, disallowed never.

    Returns ``(index, ok)``; ``ok`` is False where fewer than ``k`` tokens were allowed.
    ``stable``: break exact ties (common after max-pooling) by storage order with a stable
    sort, so the choice does not depend on batch shape or padding (the cache's eviction);
    otherwise ``torch.topk`` picks among ties in any order (the sparse reads).
    """
    scores = scores.float().masked_fill(forced, POS_INF).masked_fill(~allowed, NEG_INF)
    k = min(k, scores.shape[-1])
    if stable:
        values, index = scores.sort(dim=-1, descending=True, stable=True)
        values, index = values[..., :k], index[..., :k]
    else:
        values, index = scores.topk(k, dim=-1, sorted=False)
    index, order = index.sort(dim=-1)
    return index, values.gather(-1, order) > NEG_INF


def positions_to_indices(layer, positions: torch.Tensor, ok: torch.Tensor | None = None):
    """Map true positions ``[batch, 1|kv_heads|q_heads, n]`` to this layer's storage indices.

    One head of positions is used for every KV head; query-head positions index their own KV
    head's storage. Positions the layer no longer holds (evicted) come back with ``ok`` False.
    """
    batch, kv_heads, kept = layer.positions.shape
    heads = max(positions.shape[1], kv_heads)
    positions = positions.expand(batch, heads, positions.shape[-1])
    ok = torch.ones_like(positions, dtype=torch.bool) if ok is None else ok.expand_as(positions)
    if kept == layer.seen:  # nothing evicted: storage index == position
        return positions, ok
    table = torch.full((batch, kv_heads, layer.seen), -1, dtype=torch.long, device=positions.device)
    table.scatter_(2, layer.positions, torch.arange(kept, device=positions.device).expand(batch, kv_heads, kept))
    if heads != kv_heads:
        table = to_query_heads(table, heads)
    index = table.gather(2, positions.clamp(max=layer.seen - 1))
    return index.clamp(min=0), ok & (index >= 0)


def layer_wide(layer, scores: torch.Tensor, forced: torch.Tensor, allowed: torch.Tensor):
    """Sum ``[batch, kv_heads, kept]`` scores over heads by true position: ``[batch, seen]`` each."""
    batch, kv_heads, kept = scores.shape
    scores = scores.float().masked_fill(~allowed, 0.0)
    if kept == layer.seen:
        return scores.sum(1), forced.any(1), allowed.any(1)
    seen = layer.seen
    flat = layer.positions.reshape(batch, -1)
    total = torch.zeros(batch, seen, device=scores.device).scatter_add_(1, flat, scores.reshape(batch, -1))
    any_forced = torch.zeros(batch, seen, device=scores.device).scatter_add_(1, flat, forced.reshape(batch, -1).float()) > 0
    any_allowed = torch.zeros(batch, seen, device=scores.device).scatter_add_(1, flat, allowed.reshape(batch, -1).float()) > 0
    return total, any_forced, any_allowed


def recent_suffix(layer, since: int):
    """Storage indices ``[batch, kv_heads, n]`` of the tokens added since ``seen == since``."""
    batch, kv_heads, kept = layer.positions.shape
    n = min(layer.seen - since, kept)
    index = torch.arange(kept - n, kept, device=layer.positions.device).expand(batch, kv_heads, n)
    return index, layer.positions[..., kept - n:] >= since


def _row_view(tensor: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``(rows, stride)``: a ``[*, dim]`` view where row ``(b * heads + h) * stride + n`` is token ``n``
    of head ``h`` (no copy for contiguous tensors and for views of an append buffer)."""
    batch, heads, kept, dim = tensor.shape
    s0, s1, s2, s3 = tensor.stride()
    aligned = tensor.storage_offset() == 0 and s3 == 1 and s2 == dim and s1 % dim == 0 and s0 == heads * s1
    if aligned and (kept > 1 or tensor.is_contiguous()):
        stride = s1 // dim
        return tensor.as_strided((batch * heads * stride, dim), (dim, 1)), stride
    return tensor.contiguous().view(-1, dim), kept


def _flat_rows(tensor: torch.Tensor, index: torch.Tensor, stride: int) -> torch.Tensor:
    """Flat row numbers in :func:`_row_view`'s rows of ``tensor`` for ``index`` ``[batch, heads, m]``."""
    batch, kv_heads = tensor.shape[:2]
    heads, m = index.shape[1], index.shape[2]
    base = torch.arange(batch * kv_heads, device=index.device).view(batch, kv_heads, 1, 1) * stride
    return (index.reshape(batch, kv_heads, heads // kv_heads, m) + base).reshape(-1)


def gather_rows(tensor: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``tensor[b, h // r, index[b, h, j]]`` for ``index`` ``[batch, heads, m]``: ``[batch, heads, m, dim]``.

    ``heads`` is a multiple of the tensor's heads (``r`` query heads per KV head); one
    ``index_select`` over a flat row view of the storage.
    """
    rows, stride = _row_view(tensor)
    return rows.index_select(0, _flat_rows(tensor, index, stride)).view(*index.shape, tensor.shape[-1])


def gather_attend(query, key, value, index, ok, scaling: float, query_valid=None, extra=None) -> torch.Tensor:
    """SDPA of one query token over the gathered tokens ``index`` (``[batch, 1|kv|q heads, m]``).

    ``ok`` (same shape) masks slots that hold nothing (padding, evicted); ``extra`` (optional)
    adds rows of given logits (see :func:`attend_gathered`). Returns ``[batch, 1, q_heads, dim]``.
    """
    batch, kv_heads = query.shape[0], key.shape[1]
    if index.shape[1] == 1:
        index, ok = index.expand(batch, kv_heads, -1), ok.expand(batch, kv_heads, -1)
    index = index.to(key.device)
    (key_rows, key_stride), (value_rows, value_stride) = _row_view(key), _row_view(value)
    flat = _flat_rows(key, index, key_stride)  # K and V laid out alike (a cache's, a tier's): one index for both
    value_flat = flat if (value_stride, value.shape[:2]) == (key_stride, key.shape[:2]) else _flat_rows(value, index, value_stride)
    keys = key_rows.index_select(0, flat).view(*index.shape, key.shape[-1]).to(query.device)
    values = value_rows.index_select(0, value_flat).view(*index.shape, value.shape[-1]).to(query.device)
    return attend_gathered(query, keys, values, ok, scaling, query_valid, extra)


def attend_gathered(query, keys, values, ok, scaling: float, query_valid=None, extra=None) -> torch.Tensor:
    """SDPA of one query token over gathered ``keys``/``values`` ``[batch, heads, m, dim]`` (``ok``
    ``[batch, heads, m]`` masks empty slots); ``heads`` divides the query heads.

    ``extra``: ``(logits [batch, q_heads, n], values [batch, kv_heads, n, dim])``, rows that join the
    softmax with those logits as they are (not ``q·k``): summaries of tokens not read."""
    batch, q_heads = query.shape[:2]
    heads = keys.shape[1]
    if query_valid is not None:
        ok = ok | ~query_valid[:, 0, None, None]  # padding queries: no empty rows
    dim = query.shape[-1]
    # a KV head's query group attends as one block of rows (no K/V repeat, one mask row)
    packed = query.reshape(batch, heads, q_heads // heads, dim)
    if extra is not None:
        return attend_with_extra_rows(packed, keys, values, ok, scaling, extra).reshape(batch, 1, q_heads, dim)
    mask = None if bool(ok.all()) else ok[:, :, None, :]
    out = torch.nn.functional.scaled_dot_product_attention(packed, keys, values, attn_mask=mask, scale=scaling)
    return out.reshape(batch, 1, q_heads, dim)


def attend_with_extra_rows(packed, keys, values, ok, scaling: float, extra) -> torch.Tensor:
    """Attention of ``packed`` ``[batch, heads, per_head, dim]`` over the read rows ``keys``/``values``
    ``[batch, heads, m, dim]`` (-inf where not ``ok``) and ``extra``'s rows, whose logits are given:
    one softmax over both (written out: SDPA with an additive mask is ~10x slower on this CPU)."""
    extra_logits, extra_values = extra
    batch, heads, per_head, dim = packed.shape
    read = torch.matmul(packed, keys.transpose(-1, -2)).float() * scaling  # [batch, heads, per_head, m]
    read = read.masked_fill(~ok[:, :, None, :], NEG_INF)
    added = extra_logits.float().view(batch, heads, per_head, -1)
    probs = torch.softmax(torch.cat([read, added], -1), -1).to(values.dtype)  # the softmax in fp32 for any model dtype
    rows = read.shape[-1]
    extra_values = extra_values.to(values.dtype).repeat_interleave(heads // extra_values.shape[1], 1)
    return torch.matmul(probs[..., :rows], values) + torch.matmul(probs[..., rows:], extra_values)


def dense_with_probs(layer, query, key, value, scaling: float):
    """Full attention of one query token, also returning its probabilities ``[batch, q_heads, kept]``."""
    batch, q_heads, _, dim = query.shape
    kv_heads = key.shape[1]
    logits = head_logits(query, key, scaling).float()
    logits = logits.masked_fill(~to_query_heads(layer.valid, q_heads), NEG_INF)
    probs = torch.softmax(logits, dim=-1).nan_to_num_(0.0)
    grouped = probs.to(value.dtype).view(batch, kv_heads, q_heads // kv_heads, -1)
    out = torch.matmul(grouped, value).reshape(batch, 1, q_heads, dim)
    return out, probs


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean over heads of the cosine similarity of ``[batch, heads, dim]`` queries: ``[batch]``."""
    return torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=-1).mean(-1)


def reuse_read(layer, query, key, value, query_valid, scaling, saved: dict, extra=None) -> torch.Tensor:
    """Read a stored selection (``saved["positions"]``, chosen at ``saved["seen"]``) + tokens added
    since (``extra``: as in :func:`gather_attend`)."""
    index, ok = positions_to_indices(layer, saved["positions"], saved["ok"])
    heads = index.shape[1]
    recent, recent_ok = recent_suffix(layer, saved["seen"])
    valid = layer.valid
    if heads != recent.shape[1]:  # per-query-head selection: the recent tokens for every head
        recent, recent_ok = to_query_heads(recent, heads), to_query_heads(recent_ok, heads)
        valid = to_query_heads(valid, heads)
    index, ok = torch.cat([index, recent], -1), torch.cat([ok, recent_ok], -1)
    ok = ok & valid.gather(2, index)
    return gather_attend(query, key, value, index, ok, scaling, query_valid, extra)


def save_selection(layer, index: torch.Tensor, ok: torch.Tensor) -> dict:
    """Storage indices -> a position-based selection that survives later steps and evictions."""
    heads = index.shape[1]
    positions = layer.positions if heads == layer.positions.shape[1] else to_query_heads(layer.positions, heads)
    return {"positions": positions.gather(2, index), "ok": ok, "seen": layer.seen}


def blocks_needed(length: int, block: int) -> int:
    """Blocks of ``block`` tokens needed to hold ``length`` tokens."""
    return math.ceil(length / block)
