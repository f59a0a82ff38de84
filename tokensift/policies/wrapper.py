"""Wrappers: policies that transform another policy's scores or budgets.

A wrapper holds an ``inner`` policy (built from a name or an expression such as
``caote(snapkv)``). The budget settings (``budget``, ``ratio``, ``n_sink``, ``window``,
``interval``) belong to the outermost policy, which hands them down to the inner one; the
inner keeps its own method parameters (``snapkv(kernel=5)``). The inner observes every
attention call through the wrapper; the wrapper decides what its scores become.
"""

from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass
from typing import ClassVar

import torch

from tokensift.errors import TokensiftError
from tokensift.policies.base import Policy

SHARED = ("budget", "ratio", "n_sink", "window", "interval")


@dataclass
class Wrapper(Policy):
    """Base of every wrapper: ``inner`` is a policy, a policy name or an expression."""

    default_inner: ClassVar[str] = "snapkv"
    own_layer_class: ClassVar[str | None] = None  # "module:Class" (imported lazily: no import cycle)

    inner: Policy | str | None = None

    def __post_init__(self) -> None:
        self.inner = self._build_inner()
        # instance attributes shadow the class ones: the engine reads them on the outermost policy
        self.needs_attention = type(self).needs_attention or self.inner.needs_attention
        self.layer_class = self._combined_layer_class()
        self.name = f"{type(self).name}({self.inner.name})"
        super().__post_init__()

    def shared_settings(self) -> dict:
        """The budget settings handed to the inner policy."""
        return {key: getattr(self, key) for key in SHARED}

    def _build_inner(self) -> Policy:
        from tokensift.policies.registry import build_policy

        inner = self.inner if self.inner is not None else self.default_inner
        if isinstance(inner, str):
            return build_policy(inner, **self.shared_settings())
        if not isinstance(inner, Policy):
            raise TokensiftError(f"{type(self).name}: inner must be a policy or a policy name, got {type(inner).__name__}")
        settings = {k: v for k, v in self.shared_settings().items() if getattr(inner, k) != v}
        return dataclasses.replace(inner, **settings) if settings else inner

    def _combined_layer_class(self):
        mine, theirs = load_class(type(self).own_layer_class), getattr(self.inner, "layer_class", None)
        if mine is not None and theirs is not None and mine is not theirs:
            raise TokensiftError(
                f"cannot combine {type(self).name} with {self.inner.name}: both need their own cache storage"
            )
        return mine or theirs

    # the engine's hooks go through to the inner policy unless a wrapper overrides them
    def observe(self, layer, view) -> None:
        self.inner.observe(layer, view)

    def score(self, layer) -> torch.Tensor:
        return self.inner.score(layer)

    def layer_budget(self, layer_idx: int, num_layers: int, seen: int) -> int | None:
        return self.inner.layer_budget(layer_idx, num_layers, seen)

    def prepare(self, model) -> None:
        """Called once by ``make_cache`` with the model (e.g. calibration); forwarded inward."""
        prepare = getattr(self.inner, "prepare", None)
        if prepare is not None:
            prepare(model)

    def params(self) -> dict:
        record = {key: value for key, value in dataclasses.asdict(self).items() if key != "inner"}
        record["inner"] = {"name": self.inner.name, **self.inner.params()}
        return record

    def describe(self) -> str:
        size = f"budget={self.budget}" if self.budget is not None else f"ratio={self.ratio}"
        return f"{self.name}({size})"


def load_class(spec: str | None):
    """``"package.module:Class"`` -> the class (None stays None)."""
    if spec is None:
        return None
    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)


def valid_scores(scores: torch.Tensor, layer, fill: float = 0.0) -> torch.Tensor:
    """``scores`` as fp32 with padding slots set to ``fill``."""
    return scores.float().masked_fill(~layer.valid, fill)
