"""Prefill policies: which prompt tokens are computed at each layer (time to first token).

A prefill policy fills a selecting cache with the prompt and returns the last position's logits.
``full`` computes every token at every layer (the engine's plain prefill); the others compute
a subset from some layer on, each token at its true position (RoPE and cache metadata), so any
KV policy and speculation work on the cache they leave (see ``tokensift.prefill.subset``).
Registered by name like the KV policies: ``build_prefill("lazyllm", keep="0.5,0.3")``.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass

import torch

from tokensift.errors import TokensiftError

PREFILLS: dict[str, type[PrefillPolicy]] = {}


@dataclass
class PrefillPolicy:
    """Base of every prefill policy: a dataclass whose fields are its hyper-parameters.

    Each policy lists its fields in a numpy-style ``Parameters`` section; the base has none.
    """

    name: typing.ClassVar[str] = "base"
    paper: typing.ClassVar[str] = ""

    def check(self) -> None:
        """Raise a one-line TokensiftError for bad parameters (called when built)."""

    def run(self, model, cache, ids: torch.Tensor) -> torch.Tensor:
        """Prefill ``ids`` (``[1, n]``) into the empty ``cache``; return ``[1, vocab]`` float logits."""
        raise NotImplementedError

    def params(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def prunes(self) -> bool:
        """Whether some token may skip some layer (False: the plain prefill)."""
        return True


def register(cls: type[PrefillPolicy]) -> type[PrefillPolicy]:
    """Class decorator: make a prefill policy available by its ``name``."""
    PREFILLS[cls.name] = cls
    return cls


def build_prefill(name: str | PrefillPolicy | None, **params) -> PrefillPolicy:
    """A prefill policy from its name and parameters (strings are converted), checked."""
    if isinstance(name, PrefillPolicy):
        return name
    name = name or "full"
    if name not in PREFILLS:
        raise TokensiftError(f"unknown prefill '{name}'; known prefills: {', '.join(sorted(PREFILLS))}")
    cls = PREFILLS[name]
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in params:
        if key not in fields:
            raise TokensiftError(f"prefill '{name}' has no parameter '{key}'; it has: {', '.join(fields) or 'none'}")
    policy = cls(**{key: convert(name, key, fields[key].type, value) for key, value in params.items()})
    policy.check()
    return policy


def convert(name: str, key: str, hint: str, value):
    """A CLI string to the field's type (``str``, ``int``, ``float`` or a comma list of floats)."""
    if not isinstance(value, str):
        return tuple(value) if isinstance(value, list) else value
    try:
        if hint == "str":
            return value
        if "tuple" in hint:
            return tuple(float(part) for part in value.replace(";", ",").split(",") if part.strip())
        return int(value) if hint == "int" else float(value)
    except ValueError:
        raise TokensiftError(f"parameter '{key}' of prefill '{name}' must be {hint}, got '{value}'") from None


def check_fractions(name: str, key: str, values) -> None:
    """Every value in (0, 1]."""
    for value in values:
        if not (isinstance(value, (int, float)) and 0 < value <= 1 and not math.isnan(value)):
            raise TokensiftError(f"{name}: every {key} fraction must be in (0, 1], got {value}")


def keep_count(fraction: float, tokens: int) -> int:
    """Tokens kept of ``tokens`` at ``fraction`` (at least one: the last token is always computed)."""
    return max(1, min(tokens, math.ceil(fraction * tokens)))
