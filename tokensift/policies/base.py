"""The policy interface: score cached tokens per KV head; the cache keeps the best ones.

A policy is a small dataclass whose fields are its hyper-parameters. The cache calls
``observe`` after each attention call (with an :class:`~tokensift.scoring.AttentionView`
when ``needs_attention`` is set) and ``score`` when it must drop tokens. Protected tokens
(the first ``n_sink`` and the last ``window``) and padding are handled by the cache.
"""

from __future__ import annotations

import dataclasses
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

    Parameters
    ----------
    budget:
        Cached tokens kept per layer and KV head (protected tokens included).
    ratio:
        Alternative to ``budget``: fraction of the tokens seen so far to keep (0 < ratio < 1).
    n_sink:
        The first ``n_sink`` real tokens are always kept (attention sinks).
    window:
        The most recent ``window`` tokens are always kept.
    interval:
        Decode steps between two selections: the cache may grow to ``budget + interval - 1``
        tokens before it is cut back to ``budget``.
    """

    name: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    needs_attention: ClassVar[bool] = False
    evicts: ClassVar[bool] = True

    budget: int | None = None
    ratio: float | None = None
    n_sink: int = 4
    window: int = 32
    interval: int = 1

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

    # ------------------------------------------------------------------- scoring
    def observe(self, layer: SelectingLayer, view: AttentionView | None) -> None:
        """Update running statistics after an attention call (default: nothing)."""

    def score(self, layer: SelectingLayer) -> torch.Tensor:
        """Return ``[batch, kv_heads, kept]`` scores: higher is kept first."""
        raise NotImplementedError

    # ------------------------------------------------------------------ describe
    def params(self) -> dict:
        """The hyper-parameters as a plain dict (for JSON records)."""
        return dataclasses.asdict(self)

    def describe(self) -> str:
        """Short human label, e.g. ``snapkv(budget=512)``."""
        size = f"budget={self.budget}" if self.budget is not None else f"ratio={self.ratio}"
        return self.name if not self.evicts else f"{self.name}({size})"
