"""Policies by name, and building one from a name or an expression.

Expressions compose policies (:class:`~tokensift.policies.base.Composed`): wrappers,
``adakv(caote(snapkv))``, and sparse readers over a base policy,
``tokenselect(snapkv, k=256, base_budget=2048)`` (the same as ``base=snapkv``), with optional
method parameters in the parentheses: ``pyramidkv(snapkv(kernel=5), beta=10)``. Keyword
arguments given to :func:`build_policy` (budget, ratio, n_sink, window, interval, or any
parameter of the outermost policy) go to the outermost policy; it hands its settings to the
inner one (``handed_settings``: a wrapper hands the budget settings, a reader ``n_sink``,
``window``, ``interval`` and ``base_budget``/``base_ratio`` as budget/ratio).
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field

from tokensift.errors import TokensiftError
from tokensift.policies.base import Composed, Policy

POLICIES: dict[str, type[Policy]] = {}


def register(cls: type[Policy]) -> type[Policy]:
    """Class decorator: make a policy available by its ``name``."""
    POLICIES[cls.name] = cls
    return cls


def get_policy_class(name: str) -> type[Policy]:
    """Look a policy up by name, with a one-line error listing the known ones."""
    try:
        return POLICIES[name]
    except KeyError:
        known = ", ".join(sorted(POLICIES))
        raise TokensiftError(f"unknown policy '{name}'; known policies: {known}") from None


def field_types(cls: type[Policy]) -> dict[str, type]:
    """Field name -> the plain Python type to convert a string into."""
    hints = typing.get_type_hints(cls)
    out = {}
    for item in dataclasses.fields(cls):
        hint = hints[item.name]
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        is_union = typing.get_origin(hint) in (typing.Union, types.UnionType)
        out[item.name] = args[0] if is_union and args else hint
    return out


def convert_value(cls: type[Policy], key: str, value):
    """Convert a CLI string to the type of field ``key`` of ``cls``."""
    types_ = field_types(cls)
    if key not in types_:
        raise TokensiftError(f"policy '{cls.name}' has no parameter '{key}'; it has: {', '.join(types_)}")
    if not isinstance(value, str) or key == "inner":
        return value  # an inner policy stays an expression string; the wrapper builds it
    target = types_[key]
    try:
        if target is bool:
            if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(value)
            return value.lower() in ("true", "1", "yes")
        return target(value)
    except ValueError:
        raise TokensiftError(f"parameter '{key}' of policy '{cls.name}' must be {target.__name__}, got '{value}'") from None


# ------------------------------------------------------------------- expressions
@dataclass
class Node:
    """One policy in an expression: its name, its inner policy (wrappers) and its parameters."""

    name: str
    inner: Node | None = None
    params: dict = field(default_factory=dict)


_TOKEN = re.compile(r"\s*(?:([(),=])|([^\s(),=]+))")


def _tokens(text: str) -> list[str]:
    tokens, position = [], 0
    text = text.strip()
    while position < len(text):
        match = _TOKEN.match(text, position)
        if match is None or match.end() == position:
            raise TokensiftError(f"cannot parse policy expression '{text}' at position {position}")
        tokens.append(match.group(1) or match.group(2))
        position = match.end()
    return tokens


def parse_expression(text: str) -> Node:
    """Parse ``name``, ``name(inner)`` or ``name(inner, key=value, ...)`` (nesting allowed)."""
    tokens = _tokens(text)
    if not tokens:
        raise TokensiftError("empty policy expression")
    node, rest = _parse_node(tokens, text)
    if rest:
        raise TokensiftError(f"unexpected '{rest[0]}' in policy expression '{text}'")
    return node


def _parse_node(tokens: list[str], text: str) -> tuple[Node, list[str]]:
    name, rest = tokens[0], tokens[1:]
    if name in "(),=":
        raise TokensiftError(f"expected a policy name in '{text}', got '{name}'")
    node = Node(name)
    if not rest or rest[0] != "(":
        return node, rest
    rest = rest[1:]
    while rest and rest[0] != ")":
        if len(rest) >= 2 and rest[1] == "=":
            if len(rest) < 3 or rest[2] in "(),=":
                raise TokensiftError(f"parameter '{rest[0]}' has no value in '{text}'")
            node.params[rest[0]] = rest[2]
            rest = rest[3:]
        else:
            if node.inner is not None:
                raise TokensiftError(f"policy '{name}' takes one inner policy in '{text}'")
            node.inner, rest = _parse_node(rest, text)
        if rest and rest[0] == ",":
            rest = rest[1:]
        elif rest and rest[0] != ")":
            raise TokensiftError(f"expected ',' or ')' in '{text}', got '{rest[0]}'")
    if not rest:
        raise TokensiftError(f"missing ')' in policy expression '{text}'")
    return node, rest[1:]


def _build(node: Node, outer: dict) -> Policy:
    """Build ``node``; ``outer`` holds the budget settings handed down by the enclosing policy."""
    cls = get_policy_class(node.name)
    params = {**node.params, **{k: v for k, v in outer.items() if v is not None}}
    kwargs = {k: convert_value(cls, k, v) for k, v in params.items()}
    if node.inner is not None:
        if not issubclass(cls, Composed):
            raise TokensiftError(f"policy '{node.name}' does not wrap another policy (got '{node.inner.name}' inside it)")
        cls.check_inner(node.inner.name)
        kwargs["inner"] = _build(node.inner, cls.handed_settings(kwargs))
    try:
        return cls(**kwargs)
    except TypeError as error:
        raise TokensiftError(f"cannot build policy '{node.name}': {error}") from None


def build_policy(name: str, **params) -> Policy:
    """Build a policy from a name or expression: ``build_policy("adakv(caote(snapkv))", budget=512)``."""
    return _build(parse_expression(name), {k: v for k, v in params.items() if v is not None})
