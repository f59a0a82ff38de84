"""Wrappers: policies that transform another policy's scores or budgets.

A wrapper is a :class:`~tokensift.policies.base.Composed` policy: it holds an ``inner``
policy (built from a name or an expression such as ``caote(snapkv)``). The budget settings
(``budget``, ``ratio``, ``n_sink``, ``window``, ``interval``) belong to the outermost policy,
which hands them down to the inner one; the inner keeps its own method parameters
(``snapkv(kernel=5)``). The inner observes every attention call through the wrapper; the
wrapper decides what its scores become.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import torch

from tokensift.policies.base import Composed, resolve_layer_class

SHARED = ("budget", "ratio", "n_sink", "window", "interval")


@dataclass
class Wrapper(Composed):
    """Base of every wrapper: a :class:`~tokensift.policies.base.Composed` policy whose inner
    policy gets every budget setting (``budget``, ``ratio``, ``n_sink``, ``window``, ``interval``).

    Parameters
    ----------
    inner : Policy, str or None, default None
        The wrapped policy: a policy, a policy name or an expression (None: ``default_inner``,
        ``snapkv`` unless a wrapper says otherwise).

    Plus the common parameters of :class:`~tokensift.policies.base.Policy`, handed to ``inner``.
    """

    default_inner: ClassVar[str] = "snapkv"

    def __post_init__(self) -> None:
        self.inner = self.build_inner(self.inner)
        # instance attributes shadow the class ones: the engine reads them on the outermost policy
        self.needs_attention = type(self).needs_attention or self.inner.needs_attention
        resolve_layer_class(self)  # two storages that cannot combine fail here, at build time
        self.name = f"{type(self).name}({self.inner.name})"
        super().__post_init__()

    @classmethod
    def handed_settings(cls, given: dict) -> dict:
        return {key: given[key] for key in SHARED if key in given}

    def inner_settings(self) -> dict:
        """The budget settings handed to the inner policy."""
        return {key: getattr(self, key) for key in SHARED}

    def params(self) -> dict:
        record = {key: value for key, value in dataclasses.asdict(self).items() if key != "inner"}
        record["inner"] = {"name": self.inner.name, **self.inner.params()}
        return record

    def describe(self) -> str:
        size = f"budget={self.budget}" if self.budget is not None else f"ratio={self.ratio}"
        return f"{self.name}({size})"


def valid_scores(scores: torch.Tensor, layer, fill: float = 0.0) -> torch.Tensor:
    """``scores`` as fp32 with padding slots set to ``fill``."""
    return scores.float().masked_fill(~layer.valid, fill)
