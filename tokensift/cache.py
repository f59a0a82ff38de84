"""The selecting cache: per-layer kept K/V, true positions, budgets, honest byte counts.

Full-attention layers become :class:`SelectingLayer`; sliding-window layers (Gemma 3) become
:class:`WindowLayer`, transformers' own layer holding at most its window (policies do not act
there; budgets count the selecting layers only). Each selecting layer stores, per KV head,
only the tokens its policy keeps, with their true positions; it reports to transformers the
true number of tokens seen, so RoPE positions never renumber.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import (
    DYNAMIC_LAYER_TYPE_MAPPING, Cache, CacheLayerMixin, DynamicSlidingWindowLayer, get_layer_types_and_kwargs,
)

from tokensift.policies.base import Policy
from tokensift.selection import top_k
from tokensift.tokens import TokenStore

TOKEN_TENSORS = ("keys", "values", "positions", "ranks", "valid", "sink")  # a layer's TokenStore

SMALL_APPEND = 16  # appends of at most this many tokens (decode steps, draft trees) get spare room
GROWTH_FRACTION = 16  # spare room: 1/16 of the layer (at least SMALL_APPEND slots)

# cache.shared key of a pruning prefill's current token subset (tokensift.prefill.subset.Subset)
SUBSET = "prefill_subset"

def _stored(name: str) -> property:
    """A tensor of the layer's :class:`~tokensift.tokens.TokenStore`."""
    return property(lambda self: self.store.tensors[name], lambda self, value: self.store.__setitem__(name, value))


def _lazy_metadata(name: str) -> property:
    """A per-token metadata tensor of the store, brought up to date (see ``materialize``) when read."""
    def read(self):
        if self._pending or self._unmarked:
            self.materialize()
        return self.store.tensors[name]

    return property(read, lambda self, value: self.store.__setitem__(name, value))


def _lazy_valid_seen(self) -> torch.Tensor | None:
    if self._pending or self._unmarked:
        self.materialize()
    return self._valid_seen


class SelectingLayer(CacheLayerMixin):
    """One full-attention layer's cache under a policy.

    Per-token tensors, held in one :class:`~tokensift.tokens.TokenStore` (``store``) and gathered
    together on eviction (per KV head, so heads may differ): ``keys``/``values``
    ``[batch, kv_heads, kept, dim]``, ``positions`` (index in the padded sequence), ``ranks``
    (index among the sequence's real tokens: its RoPE position under left padding), ``valid``
    (False for padding), ``sink`` (protected first tokens), and the policy's per-token
    statistics in ``token_state`` (the store's ``statistics``). ``valid_seen`` counts each
    sequence's real tokens seen.

    A layer whose policy keeps everything and watches nothing (``full``) lets that metadata
    wait: a decode step appends only K/V, and the positions, ranks... of those tokens are
    written the first time anything reads them (``materialize``), so a plain step costs what
    a DynamicCache step costs.
    """

    is_sliding = False
    is_croppable = True
    subset_prefill = True  # takes a pruning prefill's token subset at true positions (tokensift.prefill)
    subset_positions = None  # true positions of the tokens of the last update, when it was such a subset
    keys = _stored("keys")
    values = _stored("values")
    positions = _lazy_metadata("positions")
    ranks = _lazy_metadata("ranks")
    valid = _lazy_metadata("valid")
    sink = _lazy_metadata("sink")
    valid_seen = property(_lazy_valid_seen, lambda self, value: setattr(self, "_valid_seen", value))
    token_state = property(lambda self: self.store.statistics,
                           lambda self, value: setattr(self.store, "statistics", dict(value)))

    def __init__(self, layer_idx: int, num_layers: int, policy: Policy):
        self.store = TokenStore(dict.fromkeys(TOKEN_TENSORS))
        super().__init__()
        self.layer_idx = layer_idx
        self.num_layers = num_layers
        # where budgets and layer schedules place this layer: its index among the cache's selecting
        # (full-attention) layers and their count; set by SelectingCache (Gemma 3: 3 of 18 layers)
        self.depth, self.depths = layer_idx, num_layers
        self.policy = policy
        self.shared: dict = {}
        self.defer_eviction = False
        self.lazy = _metadata_can_wait(self, policy)
        self._forget_tokens()

    def _forget_tokens(self) -> None:
        """Hold nothing: no tokens seen, no policy state (a new or reset layer)."""
        self.store.clear()
        self.keys = self.values = None
        self.is_initialized = False
        self._pending = 0  # newest tokens, all real (marked valid), whose metadata waits
        self._unmarked = 0  # newest tokens appended but not yet marked by an attention call
        self.seen = 0
        self.compressed = False
        self.valid_seen: torch.Tensor | None = None
        self.state: dict = {}

    # ------------------------------------------------------------ transformers API
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        batch, heads = key_states.shape[:2]
        self.dtype, self.device = key_states.dtype, key_states.device
        self.keys = key_states[:, :, :0]
        self.values = value_states[:, :, :0]
        self.positions = torch.zeros(batch, heads, 0, dtype=torch.long, device=self.device)
        self.ranks = torch.zeros_like(self.positions)
        self.valid = torch.zeros(batch, heads, 0, dtype=torch.bool, device=self.device)
        self.sink = torch.zeros_like(self.valid)
        self.valid_seen = torch.zeros(batch, dtype=torch.long, device=self.device)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Append new tokens (assumed valid until the attention call says otherwise)."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        subset = self.shared.get(SUBSET)
        if subset is not None:
            return self._update_subset(key_states, value_states, subset)
        self.subset_positions = None
        batch, heads, new = key_states.shape[:3]
        spare = self.growth_room(new)
        self.store.append("keys", key_states, spare)
        self.store.append("values", value_states, spare)
        if self.lazy and self.kept > new:  # metadata waits (a first block is written at once)
            self._unmarked += new
        else:
            self._append_metadata(batch, heads, self.seen, new, spare)
        self.seen += new
        return self.keys, self.values

    def _update_subset(self, key_states: torch.Tensor, value_states: torch.Tensor, subset):
        """A pruning prefill's block (batch of one, empty layer): these tokens sit at the true
        positions ``subset.positions`` among ``subset.total`` prompt tokens, all of them seen."""
        if self.kept:
            raise RuntimeError("a pruning prefill needs an empty layer")
        batch, heads, new = key_states.shape[:3]
        positions = subset.positions.to(self.device)
        self.store.append("keys", key_states)
        self.store.append("values", value_states)
        self.positions = positions.expand(batch, heads, new).contiguous()
        self.ranks = self.positions.clone()
        self.valid = torch.ones(batch, heads, new, dtype=torch.bool, device=self.device)
        self.sink = self.ranks < self.policy.n_sink
        self.valid_seen = torch.full((batch,), subset.total, dtype=torch.long, device=self.device)
        self.seen = subset.total
        self.compressed = new < subset.total
        self.subset_positions = positions
        return self.keys, self.values

    def _append_metadata(self, batch: int, heads: int, start: int, new: int, spare: int) -> None:
        """Metadata of ``new`` unmarked tokens at positions ``start``..: assumed valid."""
        positions = torch.arange(start, start + new, device=self.device)
        store = self.store
        store.append("positions", positions.expand(batch, heads, new), spare)
        store.append("ranks", store["ranks"].new_zeros(batch, heads, new), spare)
        store.append("valid", store["valid"].new_ones(batch, heads, new), spare)
        store.append("sink", store["sink"].new_zeros(batch, heads, new), spare)

    def materialize(self) -> None:
        """Write the metadata of the tokens whose metadata waits (``lazy`` layers): the ``pending``
        ones exactly as ``mark_new_tokens`` would have marked them all valid, then the unmarked
        ones as ``update`` appends them."""
        pending, unmarked = self._pending, self._unmarked
        if not pending and not unmarked:
            return
        self._pending = self._unmarked = 0
        batch, heads = self.store["valid"].shape[:2]
        spare = self.growth_room(pending + unmarked)
        start = self.seen - pending - unmarked
        if pending:
            self._append_metadata(batch, heads, start, pending, spare)
            self.mark_new_tokens(torch.ones(batch, pending, dtype=torch.bool, device=self.device))
        if unmarked:
            self._append_metadata(batch, heads, start + pending, unmarked, spare)

    def growth_room(self, new: int) -> int:
        """Spare token slots to allocate when an append must copy the layer: a few decode steps'
        worth while nothing will be evicted (so they are used), none for a long block (prefill)
        or while the policy evicts every step (each eviction copies the layer anyway)."""
        if new > SMALL_APPEND or (self.policy.evicts and not self.defer_eviction):
            return 0
        return max(SMALL_APPEND, (self.kept + new) // GROWTH_FRACTION)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """Kept tokens + new ones, offset so new tokens sit at their true positions."""
        kept = self.kept
        return kept + query_length, self.seen - kept

    def get_seq_length(self) -> int:
        """The true number of tokens seen (not kept): positions continue from here."""
        return self.seen

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self._forget_tokens()

    # ------------------------------------------------------------ the token store
    def tokens(self) -> TokenStore:
        """The layer's per-token store, its metadata up to date (read it, fork it, stack it)."""
        self.materialize()
        return self.store

    def adopt(self, store: TokenStore, valid_seen: torch.Tensor, seen: int, compressed: bool = True) -> None:
        """Hold exactly the tokens of ``store`` (a fork, a stack of other layers' stores):
        ``valid_seen`` real tokens seen per sequence, ``seen`` tokens seen in all."""
        keys = store["keys"]
        self.lazy_initialization(keys[:, :, :0], store["values"][:, :, :0])
        self.store = store
        self.valid_seen, self.seen, self.compressed = valid_seen, seen, compressed

    def crop(self, max_length: int) -> None:
        """Keep the first ``max_length`` tokens seen (negative: drop the newest ``-max_length``), as
        transformers' layers do (speculative rollback)."""
        count = -max_length if max_length < 0 else self.seen - max_length
        if count <= 0 or not self.is_initialized:
            return
        if int(self.positions[..., -count:].min()) < self.seen - count:
            raise RuntimeError("cannot crop: some of the newest tokens were already evicted")
        self._gather_tokens(slice(0, self.kept - count))
        self.seen -= count

    def keep_new_tokens(self, new: int, indices) -> None:
        """Speculative rollback: keep the past and only ``indices`` (in order) of the ``new`` newest
        tokens, renumbered to consecutive true positions (the accepted path of a draft tree).

        The ``new`` tokens must still be the last stored ones (verify with eviction deferred).
        """
        if not self.is_initialized or new == 0:
            return
        idx = torch.as_tensor(indices, dtype=torch.long, device=self.device)
        past, count = self.kept - new, int(idx.numel())
        start = self.seen - new
        step = torch.arange(count, device=self.device)
        in_order = bool((idx == step).all())  # the path is the first nodes: nothing moves
        if self._pending >= new and not self._unmarked:  # metadata still waits: only K/V to trim
            self._keep_tail("keys", past, idx, in_order)
            self._keep_tail("values", past, idx, in_order)
            self._pending -= new - count
            self.seen = start + count
            return
        if past < 0 or int(self.positions[..., past:].min()) < start:
            raise RuntimeError("cannot roll back: some of the newest tokens were already evicted")
        if count < new or not in_order:  # a plain step keeps its one token: no copy
            batch, heads = self.keys.shape[:2]
            keep = torch.cat([torch.arange(past, device=self.device), past + idx])
            self._gather_tokens(keep.expand(batch, heads, -1))
        self.valid_seen = self.valid_seen - (new - count)
        self.positions[..., past:] = start + step
        self.ranks[..., past:] = (self.valid_seen - count)[:, None, None] + step
        self.sink[..., past:] = self.valid[..., past:] & (self.ranks[..., past:] < self.policy.n_sink)
        self.seen = start + count

    def _keep_tail(self, name: str, past: int, idx: torch.Tensor, in_order: bool) -> None:
        """``self.<name>`` = its first ``past`` tokens + tokens ``past + idx`` (no copy of the past
        when it has an append buffer)."""
        tensor, count = getattr(self, name), int(idx.numel())
        if in_order:
            setattr(self, name, tensor[:, :, : past + count])  # a prefix: a view (keeps the buffer)
            return
        self.store.replace_tail(name, past, tensor.index_select(2, past + idx))

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.batch_select_indices(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.materialize()
        self.store.select_rows(indices)
        self.valid_seen = self.valid_seen[indices]

    def batch_repeat_interleave(self, repeats: int) -> None:
        rows = torch.arange(self.valid_seen.shape[0], device=self.valid_seen.device)
        self.batch_select_indices(rows.repeat_interleave(repeats))

    # ----------------------------------------------------------------- properties
    @property
    def kept(self) -> int:
        return 0 if self.keys is None else self.keys.shape[-2]

    @property
    def is_plain(self) -> bool:
        """True while the layer holds exactly what a DynamicCache would (stock attention path)."""
        return not self.compressed

    @property
    def kv_bytes(self) -> int:
        """Bytes allocated for the kept K/V, spare append room included."""
        if self.keys is None:
            return 0
        return sum(self._allocated(name).nbytes for name in ("keys", "values"))

    @property
    def kv_bytes_16bit(self) -> int:
        """What the layer would hold in a 16-bit (bf16) run: its full-precision K/V at 2 bytes an element."""
        return self.kv_bytes * 2 // self.element_size

    @property
    def element_size(self) -> int:
        """Bytes per element of the model's K/V (4 in an fp32 run)."""
        return 2 if self.keys is None else self.keys.element_size()

    @property
    def tier_bytes(self) -> int:
        """Bytes in a second tier outside the resident cache (storage variants that have one)."""
        return 0

    def _allocated(self, name: str) -> torch.Tensor:
        """The tensor holding ``self.<name>``'s memory: its append buffer, or itself."""
        return self.store.allocated(name)

    @property
    def kv_bytes_full(self) -> int:
        """What a full cache of this layer would hold for the same tokens."""
        if self.keys is None:
            return 0
        batch, heads, _, dim = self.keys.shape
        return 2 * batch * heads * self.seen * dim * self.keys.element_size()

    def kept_valid_tokens(self) -> float:
        """Mean number of real (non-padding) tokens held per sequence and KV head."""
        return 0.0 if self.valid is None else float(self.valid.sum(-1).float().mean())

    # ---------------------------------------------------------------- attention
    def visibility(self, query_valid: torch.Tensor, new_block: torch.Tensor | None) -> torch.Tensor | None:
        """``[batch, kv_heads, q, kept]`` bool mask of the new queries (None: everything visible).

        Kept past tokens are visible when valid; among the new tokens, ``new_block``
        (``[batch|1, 1, q, q]``, causal when None; a tree mask during speculation) decides.
        """
        batch, heads, kept = self.valid.shape
        q_len = query_valid.shape[1]
        if q_len == 1 and bool(self.valid.all()):
            return None
        if new_block is None:
            new_block = torch.ones(q_len, q_len, dtype=torch.bool, device=self.valid.device).tril()
        past = self.valid[:, :, None, : kept - q_len].expand(batch, heads, q_len, kept - q_len)
        new = new_block.expand(batch, heads, q_len, q_len)
        visible = torch.cat([past, new], dim=-1)
        return visible | ~query_valid[:, None, :, None]  # padding queries see everything: no empty rows

    def attend(self, query, key, value, query_valid: torch.Tensor, scaling: float, new_block=None) -> torch.Tensor:
        """SDPA of the new queries over the kept tokens, GQA-native; ``[batch, q, heads, dim]``."""
        groups = query.shape[1] // key.shape[1]
        mask = self.visibility(query_valid, new_block)
        if mask is not None:
            mask = mask.repeat_interleave(groups, dim=1)
        out = torch.nn.functional.scaled_dot_product_attention(
            query, key, value, attn_mask=mask, scale=scaling, enable_gqa=groups > 1
        )
        return out.transpose(1, 2).contiguous()

    # ---------------------------------------------------------------- selection
    def mark_new_tokens(self, new_valid: torch.Tensor) -> None:
        """Record which of the newest tokens are padding ([batch, new] bool) and which are sinks."""
        new = new_valid.shape[1]
        if self.subset_positions is not None:  # a pruning prefill's block: marked by update (all real)
            return
        if self._unmarked == new and bool(new_valid.all()):
            self._pending, self._unmarked = self._pending + new, 0  # all real: the metadata can wait
            return
        heads = self.valid.shape[1]
        rank = self.valid_seen[:, None] + torch.cumsum(new_valid.long(), dim=1) - 1
        is_sink = new_valid & (rank < self.policy.n_sink)
        self.valid[..., -new:] = new_valid[:, None, :].expand(-1, heads, -1)
        self.sink[..., -new:] = is_sink[:, None, :].expand(-1, heads, -1)
        self.ranks[..., -new:] = rank.clamp(min=0)[:, None, :].expand(-1, heads, -1)
        self.valid_seen = self.valid_seen + new_valid.long().sum(1)

    def protected_mask(self) -> torch.Tensor:
        """Sinks and the most recent ``window`` tokens."""
        recent = self.positions >= self.seen - self.policy.window
        return self.sink | recent

    def enforce_budget(self) -> None:
        """Cut the layer back to its budget when it has grown past it (per KV head)."""
        if self.defer_eviction or self.lazy:
            return
        budget = self.policy.layer_budget(self.depth, self.depths, int(self.valid_seen.max()))
        if budget is None or self.kept < budget + self.policy.interval:
            return
        self.select(budget)

    def select(self, budget: int) -> None:
        """Keep the ``budget`` best tokens of each KV head: protected first, padding never."""
        # stable: exact ties (common after max-pooling) go by storage order, so the choice does
        # not depend on batch shape or padding
        keep, _ = top_k(self.policy.score(self), budget, self.protected_mask(), self.valid, stable=True)
        self._gather_tokens(keep)
        self.compressed = True

    def _gather_tokens(self, index) -> None:
        """Keep only ``index`` (a slice, or ``[batch, heads, n]`` indices) of every per-token tensor."""
        self.materialize()
        self.store.gather(index)


class SelectingCache(Cache):
    """A transformers ``Cache`` whose full-attention layers keep only what a policy selects.

    Build it with :func:`tokensift.engine.make_cache` (which also switches the model to the
    ``"tokensift"`` attention function and installs the hooks through which each attention call
    finds its layer), then ``model.generate(..., past_key_values=cache)``.
    """

    def __init__(self, config, policy: Policy):
        text_config = config.get_text_config(decoder=True)
        layer_types, layer_kwargs = get_layer_types_and_kwargs(text_config)
        num_layers = len(layer_types)
        layer_class = policy.layer_class or SelectingLayer
        layers = [
            layer_class(i, num_layers, policy)
            if kind == "full_attention"
            else policy.sliding_layer(kind, kwargs) or SLIDING_LAYER_TYPES.get(kind, DYNAMIC_LAYER_TYPE_MAPPING[kind])(**kwargs)
            for i, (kind, kwargs) in enumerate(zip(layer_types, layer_kwargs))
        ]
        super().__init__(layers=layers)
        self.policy = policy
        self.shared: dict = {}  # cross-layer state (e.g. positions chosen by a selection layer)
        selecting = self.selecting_layers
        for depth, layer in enumerate(selecting):
            layer.shared = self.shared
            layer.depth, layer.depths = depth, len(selecting)

    @property
    def selecting_layers(self) -> list[SelectingLayer]:
        return [layer for layer in self.layers if isinstance(layer, SelectingLayer)]

    @property
    def kv_bytes(self) -> int:
        """Bytes actually held in the K/V tensors of every layer (storage variants count their own)."""
        return sum(_own_figure(layer, "kv_bytes", _held_bytes) for layer in self.layers)

    @property
    def kv_bytes_full(self) -> int:
        """Bytes a full (uncompressed) cache would hold for the same tokens."""
        return sum(
            _own_figure(layer, "kv_bytes_full", _held_bytes) for layer in self.layers
        )

    @property
    def kv_bytes_bf16(self) -> int:
        """What the cache would hold in a bf16 run (packed codes and fp16 scales unchanged)."""
        return sum(
            _own_figure(layer, "kv_bytes_16bit", lambda plain: _held_bytes(plain) * 2 // _element_size(plain))
            for layer in self.layers
        )

    @property
    def kv_bytes_full_bf16(self) -> int:
        """What a full bf16 cache would hold for the same tokens: the reference users run."""
        return sum(
            _own_figure(layer, "kv_bytes_full", _held_bytes) * 2 // _element_size(layer)
            for layer in self.layers
        )

    @property
    def tier_bytes(self) -> int:
        """Bytes held in a second tier outside the resident cache (0 unless a policy keeps one)."""
        return sum(layer.tier_bytes for layer in self.selecting_layers)

    def kv_tokens(self) -> float:
        """Mean number of real tokens held per selecting layer (per sequence and KV head)."""
        layers = self.selecting_layers
        return sum(layer.kept_valid_tokens() for layer in layers) / max(len(layers), 1)

    def set_defer_eviction(self, defer: bool) -> None:
        """Suspend budget enforcement (e.g. while verifying speculative tokens)."""
        for layer in self.selecting_layers:
            layer.defer_eviction = defer

    def enforce_budget(self) -> None:
        """Apply pending evictions now (after a deferred stretch)."""
        for layer in self.selecting_layers:
            layer.enforce_budget()

    def keep_new_tokens(self, new: int, indices) -> None:
        """Speculative rollback on every layer (see :meth:`SelectingLayer.keep_new_tokens`).

        Transformers' own full-cache layers are trimmed the same way; sliding-window layers are
        not supported (speculation needs full-attention layers).
        """
        if not isinstance(indices, torch.Tensor):  # once for every layer (a tensor stays on its device)
            device = next((layer.device for layer in self.selecting_layers if layer.is_initialized), None)
            indices = torch.as_tensor(indices, dtype=torch.long, device=device)
        for layer in self.layers:
            if isinstance(layer, SelectingLayer):
                layer.keep_new_tokens(new, indices)
            elif getattr(layer, "is_sliding", False):
                raise RuntimeError("speculative rollback needs full-attention layers (no sliding window)")
            elif getattr(layer, "keys", None) is not None and layer.keys.numel():
                idx = torch.as_tensor(indices, dtype=torch.long, device=layer.keys.device)
                past = layer.keys.shape[-2] - new
                layer.keys = torch.cat([layer.keys[:, :, :past], layer.keys[:, :, past + idx]], dim=-2)
                layer.values = torch.cat([layer.values[:, :, :past], layer.values[:, :, past + idx]], dim=-2)


class WindowLayer(DynamicSlidingWindowLayer):
    """transformers' sliding-window layer, holding at most its window in memory.

    After a multi-token append (a prefill) the stock layer keeps a *view* of the last
    ``window - 1`` tokens of the whole block, so the whole prompt's K/V stay allocated; this one
    keeps a copy of just those tokens. Decode steps are unchanged.
    """

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        keys, values = super().update(key_states, value_states, *args, **kwargs)
        if key_states.shape[-2] > 1 and not self.record_past and self.keys.untyped_storage().nbytes() > self.keys.nbytes:
            self.keys, self.values = self.keys.clone(), self.values.clone()
        return keys, values


SLIDING_LAYER_TYPES = {"sliding_attention": WindowLayer}


def _own_figure(layer, name: str, otherwise) -> int:
    """A layer's own byte figure when it reports one (tokensift layers), else ``otherwise(layer)``
    (transformers' layers: the bytes of their K/V tensors)."""
    return getattr(layer, name) if hasattr(type(layer), name) else otherwise(layer)


def _held_bytes(layer) -> int:
    """Bytes of the memory a transformers layer's K/V hold: whole storages (a sliding-window layer
    keeps a view of a longer tensor)."""
    keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
    if keys is None or values is None:
        return 0
    return keys.untyped_storage().nbytes() + values.untyped_storage().nbytes()


def _element_size(layer) -> int:
    size = getattr(layer, "element_size", None)
    if isinstance(size, int):
        return size
    keys = getattr(layer, "keys", None)
    return 2 if keys is None else keys.element_size()


def _metadata_can_wait(layer: SelectingLayer, policy: Policy) -> bool:
    """Whether a layer's per-token metadata may be written only when read: a stock layer whose
    policy evicts nothing, reads no subset and observes nothing."""
    return (type(layer) is SelectingLayer and not policy.evicts and not policy.needs_attention
            and not policy.reads_subset and type(policy).observe is Policy.observe)

