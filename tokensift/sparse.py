"""Query-aware sparse reading: keep the whole cache, attend to a few chosen tokens per step.

A *reading* policy (``reads_subset = True``) subclasses :class:`SparsePolicy`. Its
``layer_class`` is built by :func:`sparse_layer_class` on top of whatever layer class stores
the K/V (plain :class:`~tokensift.cache.SelectingLayer`, an evicting policy's, or a storage
variant such as zipcache's), so reading composes with eviction and precision policies:
``build_policy("tokenselect", k=256, base="snapkv", base_budget=2048)``.

Per decode step (one new query per sequence) over a layer holding more than ``k`` tokens,
the layer reports itself non-plain and :meth:`SparsePolicy.read` runs instead of dense
attention: the method scores tokens (or reuses an earlier choice), the shared helpers here
pick the top ``k`` per head with protected tokens (sinks, recent window, the query's own
token) forced in and padding forced out, gather the chosen K/V rows (``index_select`` on a
flat view) and run SDPA over them. Prefill and multi-token blocks stay dense.

``k`` counts every token read per head at a fresh selection, protected tokens included (like
an eviction ``budget``); steps that reuse an earlier selection also read the tokens added
since (at most ``interval``-like few).

Selections that outlive a step or cross layers are stored as *positions* (true token
indices), and mapped back to each layer's storage with :func:`positions_to_indices`, so they
stay correct when an evicting base policy has dropped or reordered tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from tokensift.errors import TokensiftError
from tokensift.policies.base import Policy

NEG_INF = float("-inf")
POS_INF = float("inf")

_LAYER_CLASSES: dict[type, type] = {}


# ------------------------------------------------------------------------ layer mixin
class SparseReadMixin:
    """Mixed into a SelectingLayer subclass: sparse reads for single-token decode queries."""

    _query_len: int = 0

    def mark_new_tokens(self, new_valid: torch.Tensor) -> None:
        self._query_len = new_valid.shape[1]
        super().mark_new_tokens(new_valid)

    def sparse_step(self) -> bool:
        """Will the coming attention call read a subset (one query token, policy says so)?"""
        return self._query_len == 1 and self.policy.wants_sparse(self)

    @property
    def is_plain(self) -> bool:
        return super().is_plain and not self.sparse_step()

    def attend(self, query, key, value, query_valid, scaling, new_block=None):
        if query.shape[2] == 1 and self.policy.wants_sparse(self):
            output = self.policy.read(self, query, key, value, query_valid, scaling)
            if output is not None:
                count(self, "sparse")
                return output
        count(self, "dense")
        return super().attend(query, key, value, query_valid, scaling, new_block)


def sparse_layer_class(base: type) -> type:
    """``base`` (a SelectingLayer subclass) with sparse reading mixed in (cached per base)."""
    if issubclass(base, SparseReadMixin):
        return base
    if base not in _LAYER_CLASSES:
        _LAYER_CLASSES[base] = type(f"Sparse{base.__name__}", (SparseReadMixin, base), {})
    return _LAYER_CLASSES[base]


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


# ------------------------------------------------------------------------------ policy
@dataclass
class SparsePolicy(Policy):
    """Base of the reading policies: ``k`` tokens read per head per decode step.

    Parameters (besides the base ``n_sink`` / ``window``, which are always read)
    ----------
    k:
        Tokens read per head at a selection, protected tokens (sinks, window) included.
        ``budget=`` is accepted as an alias (the benchmark runner passes ``budget``).
    base:
        Optional policy that manages storage under the reading: an evicting policy
        (``snapkv``, ``h2o``...) with ``base_budget`` / ``base_ratio``, or a storage policy
        (``zipcache``). Its layer class, observation, scores and budgets are used as is.
    """

    evicts: ClassVar[bool] = False
    reads_subset: ClassVar[bool] = True
    takes_base: ClassVar[bool] = True  # False: the reader owns its storage (``base`` is refused)

    window: int = 16
    k: int | None = None
    base: str | None = None
    base_budget: int | None = None
    base_ratio: float | None = None

    def validate(self) -> None:
        name = self.name
        if self.ratio is not None:
            raise TokensiftError(f"policy '{name}' reads k=N tokens per head per step: it takes k (or budget), not ratio")
        if self.budget is not None:
            if self.k is not None and self.k != self.budget:
                raise TokensiftError(f"policy '{name}': budget is an alias of k; give one of them (got k={self.k}, budget={self.budget})")
            self.k, self.budget = self.budget, None
        if self.k is None:
            raise TokensiftError(f"policy '{name}' needs k=N (tokens read per head per step; budget=N also works)")
        if self.n_sink < 0 or self.window < 0:
            raise TokensiftError(f"{name}: n_sink and window must be >= 0 (got {self.n_sink}, {self.window})")
        if self.interval < 1:
            raise TokensiftError(f"{name}: interval must be >= 1 (got {self.interval})")
        if self.k <= self.protected:
            raise TokensiftError(
                f"k {self.k} leaves no room beyond the {self.protected} protected tokens "
                f"(n_sink {self.n_sink} + window {self.window}): raise k or lower window/n_sink"
            )
        self.validate_method()
        self._build_base()

    def validate_method(self) -> None:
        """Method-specific checks (one-line TokensiftError)."""

    def _build_base(self) -> None:
        from tokensift.policies.registry import build_policy

        inner = None
        if self.base is not None:
            if self.base == self.name or getattr(_policy_class(self.base), "reads_subset", False):
                raise TokensiftError(f"policy '{self.name}': base must be an evicting or storage policy, not '{self.base}'")
            params = dict(n_sink=self.n_sink, window=self.window, interval=self.interval)
            if self.base_budget is not None:
                params["budget"] = self.base_budget
            if self.base_ratio is not None:
                params["ratio"] = self.base_ratio
            inner = build_policy(self.base, **params)
            self.evicts = inner.evicts
            self.needs_attention = inner.needs_attention
        elif self.base_budget is not None or self.base_ratio is not None:
            raise TokensiftError(f"policy '{self.name}': base_budget/base_ratio need base=POLICY")
        self.__dict__["inner"] = inner

    def __getattr__(self, name: str):
        # storage layers (zipcache...) read their own hyper-parameters off layer.policy
        inner = self.__dict__.get("inner")
        if inner is None or name.startswith("__"):
            raise AttributeError(name)
        return getattr(inner, name)

    @property
    def layer_class(self) -> type:
        from tokensift.cache import SelectingLayer

        inner = self.__dict__.get("inner")
        base = getattr(inner, "layer_class", None) if inner is not None else None
        return sparse_layer_class(base or SelectingLayer)

    # -------------------------------------------------------- delegation to base
    def observe(self, layer, view) -> None:
        inner = self.__dict__.get("inner")
        if inner is not None:
            inner.observe(layer, view)

    def score(self, layer) -> torch.Tensor:
        return self.__dict__["inner"].score(layer)

    def layer_budget(self, layer_idx: int, num_layers: int, seen: int) -> int | None:
        inner = self.__dict__.get("inner")
        return None if inner is None else inner.layer_budget(layer_idx, num_layers, seen)

    def describe(self) -> str:
        label = f"{self.name}(k={self.k}"
        if self.base is not None:
            size = f",budget={self.base_budget}" if self.base_budget is not None else (
                f",ratio={self.base_ratio}" if self.base_ratio is not None else "")
            label += f",base={self.base}{size}"
        return label + ")"

    # ----------------------------------------------------------------- reading
    def wants_sparse(self, layer) -> bool:
        """Read a subset in this layer now? (Called for single-token queries only.)"""
        return layer.kept > self.k

    def read(self, layer, query, key, value, query_valid, scaling) -> torch.Tensor | None:
        """Attention output ``[batch, 1, heads, dim]`` of a sparse read, or None (dense)."""
        raise NotImplementedError


def _policy_class(name: str):
    from tokensift.policies.registry import get_policy_class

    return get_policy_class(name)


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


def top_k(scores: torch.Tensor, k: int, forced: torch.Tensor, allowed: torch.Tensor):
    """Indices ``[batch, heads, k]`` (sorted) of the best ``scores``, forced first, disallowed never.

    Returns ``(index, ok)``; ``ok`` is False where fewer than ``k`` tokens were allowed.
    """
    scores = scores.float().masked_fill(forced, POS_INF).masked_fill(~allowed, NEG_INF)
    k = min(k, scores.shape[-1])
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


def gather_rows(tensor: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``tensor[b, h // r, index[b, h, j]]`` for ``index`` ``[batch, heads, m]``: ``[batch, heads, m, dim]``.

    ``heads`` is a multiple of the tensor's heads (``r`` query heads per KV head); one
    ``index_select`` over a flat row view of the storage.
    """
    batch, kv_heads, _, dim = tensor.shape
    heads, m = index.shape[1], index.shape[2]
    rows, stride = _row_view(tensor)
    base = torch.arange(batch * kv_heads, device=index.device).view(batch, kv_heads, 1, 1) * stride
    flat = index.reshape(batch, kv_heads, heads // kv_heads, m) + base
    return rows.index_select(0, flat.reshape(-1)).view(batch, heads, m, dim)


def gather_attend(query, key, value, index, ok, scaling: float, query_valid=None) -> torch.Tensor:
    """SDPA of one query token over the gathered tokens ``index`` (``[batch, 1|kv|q heads, m]``).

    ``ok`` (same shape) masks slots that hold nothing (padding, evicted). Returns ``[batch, 1, q_heads, dim]``.
    """
    batch, kv_heads = query.shape[0], key.shape[1]
    if index.shape[1] == 1:
        index, ok = index.expand(batch, kv_heads, -1), ok.expand(batch, kv_heads, -1)
    rows = index.to(key.device)
    keys, values = gather_rows(key, rows).to(query.device), gather_rows(value, rows).to(query.device)
    return attend_gathered(query, keys, values, ok, scaling, query_valid)


def attend_gathered(query, keys, values, ok, scaling: float, query_valid=None) -> torch.Tensor:
    """SDPA of one query token over gathered ``keys``/``values`` ``[batch, heads, m, dim]`` (``ok``
    ``[batch, heads, m]`` masks empty slots); ``heads`` divides the query heads."""
    batch, q_heads = query.shape[:2]
    heads = keys.shape[1]
    if query_valid is not None:
        ok = ok | ~query_valid[:, 0, None, None]  # padding queries: no empty rows
    mask = None if bool(ok.all()) else ok[:, :, None, :]
    dim = query.shape[-1]
    # a KV head's query group attends as one block of rows (no K/V repeat, one mask row)
    packed = query.reshape(batch, heads, q_heads // heads, dim)
    out = torch.nn.functional.scaled_dot_product_attention(packed, keys, values, attn_mask=mask, scale=scaling)
    return out.reshape(batch, 1, q_heads, dim)


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


def reuse_read(layer, query, key, value, query_valid, scaling, saved: dict) -> torch.Tensor:
    """Read a stored selection (``saved["positions"]``, chosen at ``saved["seen"]``) + tokens added since."""
    index, ok = positions_to_indices(layer, saved["positions"], saved["ok"])
    heads = index.shape[1]
    recent, recent_ok = recent_suffix(layer, saved["seen"])
    valid = layer.valid
    if heads != recent.shape[1]:  # per-query-head selection: the recent tokens for every head
        recent, recent_ok = to_query_heads(recent, heads), to_query_heads(recent_ok, heads)
        valid = to_query_heads(valid, heads)
    index, ok = torch.cat([index, recent], -1), torch.cat([ok, recent_ok], -1)
    ok = ok & valid.gather(2, index)
    return gather_attend(query, key, value, index, ok, scaling, query_valid)


def save_selection(layer, index: torch.Tensor, ok: torch.Tensor) -> dict:
    """Storage indices -> a position-based selection that survives later steps and evictions."""
    heads = index.shape[1]
    positions = layer.positions if heads == layer.positions.shape[1] else to_query_heads(layer.positions, heads)
    return {"positions": positions.gather(2, index), "ok": ok, "seen": layer.seen}


def blocks_needed(length: int, block: int) -> int:
    return math.ceil(length / block)


# ------------------------------------------------------- selection shared across layers
@dataclass
class CrossLayerPolicy(SparsePolicy):
    """Selection layers attend fully and choose one set of positions for the whole layer;
    the following layers read only those positions (cross-layer state in ``layer.shared``).

    ``full_layers``: the first layers attend fully and select nothing; layer ``full_layers`` is
    the first selection layer. ``reselect_layer``: a later layer that selects again (None:
    ``num_layers // 2``; -1: none).
    """

    full_layers: int = 2
    reselect_layer: int | None = None
    shared_key: ClassVar[str] = "cross_layer"

    def validate_method(self) -> None:
        if self.full_layers < 0:
            raise TokensiftError(f"{self.name}: full_layers must be >= 0 (got {self.full_layers})")
        if self.reselect_layer is not None and self.reselect_layer < -1:
            raise TokensiftError(f"{self.name}: reselect_layer must be a layer index, None or -1 (got {self.reselect_layer})")

    def selection_layers(self, num_layers: int) -> set[int]:
        again = num_layers // 2 if self.reselect_layer is None else self.reselect_layer
        return {self.full_layers} | ({again} if again > self.full_layers else set())

    def wants_sparse(self, layer) -> bool:
        return layer.depth >= self.full_layers and layer.kept > self.k

    def rank(self, layer, query, key, probs, scaling) -> torch.Tensor:
        """Scores ``[batch, kv_heads, kept]`` from which the layer-wide set is chosen."""
        raise NotImplementedError

    def read(self, layer, query, key, value, query_valid, scaling):
        if layer.depth in self.selection_layers(layer.depths):
            count(layer, "fresh")
            output, probs = dense_with_probs(layer, query, key, value, scaling)
            scores = self.rank(layer, query, key, probs, scaling)
            total, forced, allowed = layer_wide(layer, scores, forced_mask(layer), layer.valid)
            positions, ok = top_k(total[:, None], self.k, forced[:, None], allowed[:, None])
            layer.shared[self.shared_key] = {"positions": positions, "ok": ok, "seen": layer.seen}
            return output
        saved = layer.shared.get(self.shared_key)
        if saved is None or saved["seen"] != layer.seen or saved["positions"].shape[0] != query.shape[0]:
            return None  # no selection for this step (e.g. the selection layer was dense): read everything
        count(layer, "reused")
        index, ok = positions_to_indices(layer, saved["positions"], saved["ok"])
        ok = ok & layer.valid.gather(2, index)
        return gather_attend(query, key, value, index, ok, scaling, query_valid)
