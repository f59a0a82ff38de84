"""Every hyper-parameter of a registered policy, prefill policy, drafter, visual token selector
(and of ``VisualTokenPruner``) is listed in a numpy-style ``Parameters`` section
(``name : type, default ...``) of its class docstring, or, for an inherited one, of the base
class that declares it."""

from __future__ import annotations

import dataclasses
import inspect
import re

import pytest

from tokensift.policies.base import Policy
from tokensift.policies.registry import POLICIES
from tokensift.prefill import PREFILLS
from tokensift.speculative import DRAFTER_NAMES, Speculator, build_drafters
from tokensift.speculative.adaptive import AcceptanceStats
from tokensift.vision.selectors import SELECTORS  # torch only, like tests/test_vision_selectors.py: no extra needed
from tokensift.vision.vlm import VisualTokenPruner

ENTRY = re.compile(r"^(\w+(?:\s*,\s*\w+)*)\s+:")


def listed(cls) -> set[str]:
    """Names given as ``name :`` entries in the Parameters section of ``cls``'s own docstring."""
    lines = inspect.cleandoc(cls.__dict__.get("__doc__") or "").splitlines()
    names: set[str] = set()
    inside = False
    for index, line in enumerate(lines):
        underlined = index + 1 < len(lines) and set(lines[index + 1].strip()) == {"-"} and line.strip()
        if underlined:
            inside = line.strip() == "Parameters"
            continue
        match = ENTRY.match(line) if inside else None
        if match:
            names.update(part.strip() for part in match.group(1).split(","))
    return names


def declaring_class(cls, name: str):
    """The nearest class in ``cls``'s MRO whose own body declares the field ``name``."""
    return next(k for k in cls.__mro__ if name in k.__dict__.get("__annotations__", {}))


def user_fields(cls) -> list[str]:
    return [f.name for f in dataclasses.fields(cls) if f.init and not f.name.startswith("_")]


def missing_fields(cls) -> list[str]:
    """Fields not listed by the class that declares them (nor by ``cls`` itself)."""
    return [name for name in user_fields(cls) if name not in listed(cls) | listed(declaring_class(cls, name))]


def init_parameters(cls) -> list[str]:
    return [p for p in inspect.signature(cls.__init__).parameters if p != "self" and not p.startswith("_")]


def test_parser_reads_entries():
    class Example:
        """Summary.

        Parameters
        ----------
        alpha : int, default 1
            Meaning.
        beta, gamma : float
            Meaning, with a colon: here.

        Plus nothing : else.

        Returns
        -------
        delta : int
        """

    assert listed(Example) == {"alpha", "beta", "gamma"}


METHOD_CLASSES = {**{f"policy:{n}": c for n, c in POLICIES.items()}, **{f"prefill:{n}": c for n, c in PREFILLS.items()},
                  **{f"vision:{n}": c for n, c in SELECTORS.items()}}


@pytest.mark.parametrize("key", sorted(METHOD_CLASSES))
def test_method_parameters_documented(key):
    """Every KV policy, prefill policy and vision selector lists each of its fields."""
    cls = METHOD_CLASSES[key]
    assert "Parameters\n----------" in inspect.cleandoc(cls.__doc__ or ""), f"{cls.__name__} has no Parameters section"
    assert missing_fields(cls) == [], f"{cls.__name__} does not list {missing_fields(cls)}"


def test_common_policy_parameters_documented_once():
    assert {f.name for f in dataclasses.fields(Policy)} <= listed(Policy)


def drafter_classes() -> list[type]:
    classes = {type(d) for name in DRAFTER_NAMES for d in build_drafters(name, vocab_size=8)}
    return sorted(classes, key=lambda cls: cls.name)


@pytest.mark.parametrize("cls", [*drafter_classes(), Speculator, AcceptanceStats], ids=lambda cls: cls.__name__)
def test_speculative_parameters_documented(cls):
    missing = [name for name in init_parameters(cls) if name not in listed(cls)]
    assert missing == [], f"{cls.__name__} does not list {missing}"


def test_visual_token_pruner_parameters_documented():
    assert missing_fields(VisualTokenPruner) == [], f"VisualTokenPruner does not list {missing_fields(VisualTokenPruner)}"


def test_a_missing_entry_fails():
    class Bare(Policy):
        """No Parameters section of its own."""

        name = "bare"
        extra: int = 0

    Bare = dataclasses.dataclass(Bare)
    assert missing_fields(Bare) == ["extra"]
