"""The policy interface: score cached tokens per KV head; the cache keeps the best ones.

A policy is a small dataclass whose fields are its hyper-parameters. The cache calls
``observe`` after each attention call (with an :class:`~tokensift.scoring.AttentionView`
when ``needs_attention`` is set) and ``score`` when it must drop tokens. Protected tokens
(the first ``n_sink`` and the last ``window``) and padding are handled by the cache.

:class:`Policy` declares everything the engine reads off a policy (class attributes, the
hooks with their defaults); nothing is looked up with ``getattr``. :class:`Composed` is the one
way to build a policy on another (``inner``): wrappers and sparse readers alike.

Imports stay one way: policies never import the cache or its storage at module import time;
a policy names its storage as a ``"module:Class"`` string (``storage``), resolved by
:func:`resolve_layer_class` when a cache is built.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch

from tokensift.errors import TokensiftError

if TYPE_CHECKING:
    from tokensift.cache import SelectingLayer
    from tokensift.scoring import AttentionView


@dataclass
class Policy:
    """Base class of every KV policy.

    The parameters below are common to every policy; a policy's own docstring lists only its
    own ones (and those whose meaning or default it changes). An evicting policy takes exactly
    one of ``budget`` and ``ratio``; a policy that keeps every token takes neither.

    Parameters
    ----------
    budget : int or None, default None
        Cached tokens kept per layer and KV head (protected tokens included).
    ratio : float or None, default None
        Alternative to ``budget``: fraction of the tokens seen so far to keep (0 < ratio < 1).
    n_sink : int, default 4
        The first ``n_sink`` real tokens are always kept (attention sinks).
    window : int, default 32
        The most recent ``window`` tokens are always kept.
    interval : int, default 1
        Decode steps between two selections: the cache may grow to ``budget + interval - 1``
        tokens before it is cut back to ``budget``.
    """

    name: ClassVar[str] = ""
    """Registry name (composed policies: ``outer(inner)``)."""
    paper: ClassVar[str] = ""
    """The method's reference, one line."""
    needs_attention: ClassVar[bool] = False
    """Whether ``observe`` needs the attention probabilities (an AttentionView; else it gets None)."""
    evicts: ClassVar[bool] = True
    """Whether the policy drops tokens (then it takes ``budget`` or ``ratio``)."""
    reads_subset: ClassVar[bool] = False
    """Whether decode steps read a subset of the cache (a SparsePolicy: ``wants_sparse``/``read``)."""
    storage: ClassVar[str | None] = None
    """``"module:Class"`` of the layer class that stores this policy's tokens (None: SelectingLayer)."""

    budget: int | None = None
    ratio: float | None = None
    n_sink: int = 4
    window: int = 32
    interval: int = 1

    inner: ClassVar[Policy | None] = None
    """The policy this one is built on (a :class:`Composed` policy's field); None for a plain policy."""

    def __post_init__(self) -> None:
        self.validate()

    # ----------------------------------------------------------------- validation
    @property
    def protected(self) -> int:
        """How many tokens are always kept (sinks + recent window)."""
        return self.n_sink + self.window

    def validate(self) -> None:
        """Raise a one-line TokensiftError for impossible settings."""
        if self.n_sink < 0 or self.window < 0:
            raise TokensiftError(f"{self.name}: n_sink and window must be >= 0 (got {self.n_sink}, {self.window})")
        if self.interval < 1:
            raise TokensiftError(f"{self.name}: interval must be >= 1 (got {self.interval})")
        if not self.evicts:
            if self.budget is not None or self.ratio is not None:
                raise TokensiftError(f"policy '{self.name}' keeps every token: it takes no budget or ratio")
            return
        if (self.budget is None) == (self.ratio is None):
            raise TokensiftError(f"policy '{self.name}' needs exactly one of budget=N or ratio=R")
        self.check_size()

    def check_size(self) -> None:
        """A given ratio must be a fraction in (0, 1); a given budget must exceed the protected tokens."""
        if self.ratio is not None and not 0.0 < self.ratio < 1.0:
            raise TokensiftError(f"ratio must be between 0 and 1 exclusive (got {self.ratio}): it is the fraction kept")
        if self.budget is not None and self.budget <= self.protected:
            raise TokensiftError(
                f"budget {self.budget} leaves no room beyond the {self.protected} protected tokens "
                f"(n_sink {self.n_sink} + window {self.window}): raise the budget or lower window/n_sink"
            )

    # ------------------------------------------------------------------- budgets
    def layer_budget(self, layer_idx: int, num_layers: int, seen: int) -> int | None:
        """Tokens to keep in a layer that has seen ``seen`` tokens; None keeps all."""
        if not self.evicts:
            return None
        return self.size_budget(seen)

    def size_budget(self, seen: int) -> int:
        """The token budget for ``seen`` tokens: ``budget``, or ``ratio`` of them (above the protected)."""
        if self.budget is not None:
            return self.budget
        return max(math.ceil(self.ratio * seen), self.protected + 1)

    def sliding_layer(self, kind: str, kwargs: dict):
        """The cache layer of a sliding-window layer (``kind`` and transformers' layer ``kwargs``), or None
        for the default (transformers' own, which already holds at most its window)."""
        return None

    # -------------------------------------------------------------------- engine
    @property
    def layer_class(self) -> type | None:
        """The class of this policy's full-attention cache layers (None: the plain SelectingLayer)."""
        return resolve_layer_class(self)

    def prepare(self, model) -> None:
        """Called once by ``make_cache`` with the model (e.g. calibration); default nothing."""

    # ------------------------------------------------------------------- scoring
    def observe(self, layer: SelectingLayer, view: AttentionView | None) -> None:
        """Update running statistics after an attention call (default: nothing)."""

    def score(self, layer: SelectingLayer) -> torch.Tensor:
        """Return ``[batch, kv_heads, kept]`` scores: higher is kept first."""
        raise NotImplementedError

    def keep_across_heads(self, layer: SelectingLayer, budget: int) -> torch.Tensor:
        """``[batch, kv_heads, slots]`` bool: the tokens kept when the layer's heads may hold
        different numbers of them (``budget x kv_heads`` per sequence; variable-length storage)."""
        raise TokensiftError(f"policy '{self.name}' does not split a budget across heads")

    # ------------------------------------------------------------------- reading
    def wants_sparse(self, layer: SelectingLayer) -> bool:
        """Read a subset in this layer now? (Asked by sparse-reading layers for one-token queries.)"""
        return False

    def read(self, layer: SelectingLayer, query, key, value, query_valid, scaling) -> torch.Tensor | None:
        """Attention output ``[batch, 1, heads, dim]`` of a sparse read, or None (dense)."""
        return None

    # ------------------------------------------------------------------ describe
    def params(self) -> dict:
        """The hyper-parameters as a plain dict (for JSON records)."""
        return dataclasses.asdict(self)

    def describe(self) -> str:
        """Short human label, e.g. ``snapkv(budget=512)``."""
        size = f"budget={self.budget}" if self.budget is not None else f"ratio={self.ratio}"
        return self.name if not self.evicts else f"{self.name}({size})"


@dataclass
class Composed(Policy):
    """A policy built on another one, ``inner``: the one composition primitive.

    Wrappers (:class:`~tokensift.policies.wrapper.Wrapper`) transform their inner policy's
    scores or budgets; reading policies (:class:`~tokensift.policies.sparse_base.SparsePolicy`)
    read a subset of what their inner (base) policy keeps. Expressions spell both alike:
    ``caote(snapkv)``, ``tokenselect(snapkv, k=256, base_budget=2048)``. The outer policy hands
    the settings of :meth:`inner_settings` down (the inner keeps its own method parameters);
    the engine's calls go through to the inner policy unless the outer one overrides them.

    Parameters
    ----------
    inner : Policy, str or None, default None
        The inner policy: a policy, a policy name or an expression (None: ``default_inner``,
        or no inner policy when that is None too).

    Plus the common parameters of :class:`Policy`.
    """

    default_inner: ClassVar[str | None] = None

    inner: Policy | str | None = None

    @classmethod
    def check_inner(cls, name: str) -> None:
        """Refuse an inner policy (by its registry ``name``) before an expression builds it."""

    @classmethod
    def handed_settings(cls, given: dict) -> dict:
        """Settings an expression hands to the inner policy it builds first, from the keyword
        arguments ``given`` to this policy."""
        raise NotImplementedError

    def inner_settings(self) -> dict:
        """The settings this policy imposes on its inner policy."""
        raise NotImplementedError

    def build_inner(self, inner: Policy | str | None) -> Policy | None:
        """``inner`` (a policy, a name or an expression; None: ``default_inner``) built with
        :meth:`inner_settings`; a given policy is copied with those settings where they differ."""
        from tokensift.policies.registry import build_policy

        inner = inner if inner is not None else self.default_inner
        if inner is None:
            return None
        if isinstance(inner, str):
            return build_policy(inner, **self.inner_settings())
        if not isinstance(inner, Policy):
            raise TokensiftError(f"{type(self).name}: inner must be a policy or a policy name, got {type(inner).__name__}")
        settings = {k: v for k, v in self.inner_settings().items() if getattr(inner, k) != v}
        return dataclasses.replace(inner, **settings) if settings else inner

    # the engine's calls go through to the inner policy unless a subclass overrides them
    def observe(self, layer, view) -> None:
        if self.inner is not None:
            self.inner.observe(layer, view)

    def score(self, layer) -> torch.Tensor:
        if self.inner is None:
            return super().score(layer)
        return self.inner.score(layer)

    def layer_budget(self, layer_idx: int, num_layers: int, seen: int) -> int | None:
        if self.inner is None:
            return super().layer_budget(layer_idx, num_layers, seen)
        return self.inner.layer_budget(layer_idx, num_layers, seen)

    def keep_across_heads(self, layer, budget: int) -> torch.Tensor:
        if self.inner is None:
            return super().keep_across_heads(layer, budget)
        return self.inner.keep_across_heads(layer, budget)

    def prepare(self, model) -> None:
        if self.inner is not None:
            self.inner.prepare(model)


def load_class(spec: str | None):
    """``"package.module:Class"`` -> the class (None stays None)."""
    if spec is None:
        return None
    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)


def resolve_layer_class(policy: Policy) -> type | None:
    """The layer class a cache builds for ``policy`` (None: plain SelectingLayer): its own
    ``storage``, else its inner policy's (two different ones cannot combine); with sparse
    reading mixed in when the policy ``reads_subset``. Imported here, when a cache is built."""
    own = load_class(type(policy).storage)
    inner = policy.inner.layer_class if isinstance(policy.inner, Policy) else None
    if own is not None and inner is not None and own is not inner:
        raise TokensiftError(f"cannot combine {type(policy).name} with {policy.inner.name}: both need their own cache storage")
    layer_class = own or inner
    if policy.reads_subset:
        from tokensift.cache import SelectingLayer
        from tokensift.storage.sparse_layer import sparse_layer_class

        layer_class = sparse_layer_class(layer_class or SelectingLayer)
    return layer_class
