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

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import torch

from tokensift.errors import TokensiftError
from tokensift.policies.base import Composed
from tokensift.selection import (
    count, dense_with_probs, forced_mask, gather_attend, layer_wide, positions_to_indices, top_k,
)

HANDED = ("n_sink", "window", "interval")  # settings a reader hands to its base policy


@dataclass
class SparsePolicy(Composed):
    """Base of the reading policies: ``k`` tokens read per head per decode step.

    A :class:`~tokensift.policies.base.Composed` policy: its optional inner (base) policy
    manages the storage under the reading; the reader hands it ``n_sink``, ``window`` and
    ``interval``, and ``base_budget`` / ``base_ratio`` as its ``budget`` / ``ratio``.

    Parameters
    ----------
    k : int
        Tokens read per head at a selection, protected tokens (sinks, window) included.
        ``budget=`` is accepted as an alias (the benchmark runner passes ``budget``); one of
        them is required. ``ratio`` is refused.
    n_sink : int, default 4
        The first tokens, always read (and handed to the base policy).
    window : int, default 16
        The most recent tokens, always read (and handed to the base policy).
    interval : int, default 1
        Handed to the base policy (its decode steps between two selections).
    inner : Policy, str or None, default None
        Optional policy that manages storage under the reading: an evicting policy
        (``snapkv``, ``h2o``...) with ``base_budget`` / ``base_ratio``, or a storage policy
        (``zipcache``). Its layer class, observation, scores and budgets are used as is.
        Expressions give it as the inner policy: ``tokenselect(snapkv, k=256, base_budget=2048)``.
    base : str or None, default None
        The same as a name (the older spelling): ``tokenselect(k=256, base=snapkv,
        base_budget=2048)``. Given ``inner``, ``base`` holds its registry name.
    base_budget : int or None, default None
        The base policy's ``budget``.
    base_ratio : float or None, default None
        The base policy's ``ratio``.
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
        if self.inner is not None:  # the inner policy and ``base`` are one setting
            given = self.inner if isinstance(self.inner, str) else type(self.inner).name
            if self.base is None:
                self.base = given
            elif policy_name(self.base) != policy_name(given):
                raise TokensiftError(f"policy '{name}': give the base policy once (got {given} and base={self.base})")
        self.validate_method()
        self._build_base()

    def validate_method(self) -> None:
        """Method-specific checks (one-line TokensiftError)."""

    @classmethod
    def check_inner(cls, name: str) -> None:
        from tokensift.policies.registry import get_policy_class

        if not cls.takes_base:
            raise TokensiftError(f"policy '{cls.name}' owns its storage: it takes no base policy (got '{name}')")
        if name == cls.name or get_policy_class(name).reads_subset:
            raise TokensiftError(f"policy '{cls.name}': base must be an evicting or storage policy, not '{name}'")

    @classmethod
    def handed_settings(cls, given: dict) -> dict:
        defaults = {item.name: item.default for item in dataclasses.fields(cls)}
        settings = {key: given.get(key, defaults[key]) for key in HANDED}
        if given.get("base_budget") is not None:
            settings["budget"] = given["base_budget"]
        if given.get("base_ratio") is not None:
            settings["ratio"] = given["base_ratio"]
        return settings

    def inner_settings(self) -> dict:
        settings = {key: getattr(self, key) for key in HANDED}
        if self.base_budget is not None:
            settings["budget"] = self.base_budget
        if self.base_ratio is not None:
            settings["ratio"] = self.base_ratio
        return settings

    def _build_base(self) -> None:
        from tokensift.policies.registry import get_policy_class

        inner = None
        if self.base is not None:
            source = self.inner if self.inner is not None else self.base
            name = policy_name(source) if isinstance(source, str) else type(source).name
            if name == self.name or get_policy_class(name).reads_subset:
                raise TokensiftError(f"policy '{self.name}': base must be an evicting or storage policy, not '{self.base}'")
            inner = self.build_inner(source)
            self.evicts = inner.evicts
            self.needs_attention = inner.needs_attention
            self.base_budget, self.base_ratio = inner.budget, inner.ratio
        elif self.base_budget is not None or self.base_ratio is not None:
            raise TokensiftError(f"policy '{self.name}': base_budget/base_ratio need base=POLICY")
        self.inner = inner

    def params(self) -> dict:
        record = super().params()
        record.pop("inner")  # recorded as ``base`` (its name) and ``base_budget`` / ``base_ratio``
        return record

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


def policy_name(expression: str) -> str:
    """The outermost policy name of an expression (``caote(snapkv)`` -> ``caote``)."""
    from tokensift.policies.registry import parse_expression

    return parse_expression(expression).name


# ------------------------------------------------------- selection shared across layers
@dataclass
class CrossLayerPolicy(SparsePolicy):
    """Selection layers attend fully and choose one set of positions for the whole layer;
    the following layers read only those positions (cross-layer state in ``layer.shared``).

    Parameters
    ----------
    full_layers : int, default 2
        The first layers attend fully and select nothing; layer ``full_layers`` is the first
        selection layer.
    reselect_layer : int or None, default None
        A later layer that selects again (None: ``num_layers // 2``; -1: none).

    Plus the parameters of :class:`~tokensift.policies.sparse_base.SparsePolicy` (``k``, the base policy).
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
