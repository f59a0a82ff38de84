"""Base classes of the query-aware reading policies: keep the whole cache, read a few tokens.

A *reading* policy (``reads_subset = True``) subclasses :class:`SparsePolicy` and overrides
:meth:`~SparsePolicy.read` (and :meth:`~SparsePolicy.wants_sparse`). Its cache layers are its
storage's layer class with :class:`~tokensift.storage.sparse_layer.SparseReadMixin` mixed in
(see :attr:`~tokensift.policies.base.Policy.layer_class`), so reading composes with eviction
and precision policies: ``tokenselect(snapkv, k=256, base_budget=2048)``, also spelled
``build_policy("tokenselect", k=256, base="snapkv", base_budget=2048)``. The tensor
primitives a ``read`` uses (top-k with forced tokens, gathers, SDPA over a subset) live in
:mod:`tokensift.selection`.

``k`` counts every token read per head at a fresh selection, protected tokens included (like
an eviction ``budget``); steps that reuse an earlier selection also read the tokens added
since (at most ``interval``-like few).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from tokensift.errors import TokensiftError
from tokensift.policies.base import Policy
from tokensift.selection import (
    count, dense_with_probs, forced_mask, gather_attend, layer_wide, positions_to_indices, top_k,
)


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
        from tokensift.storage.sparse_layer import sparse_layer_class

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
