"""Policies by name, and building one from strings (CLI ``--set key=value``)."""

from __future__ import annotations

import dataclasses
import types
import typing

from tokensift.errors import TokensiftError
from tokensift.policies.base import Policy

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
    for field in dataclasses.fields(cls):
        hint = hints[field.name]
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        is_union = typing.get_origin(hint) in (typing.Union, types.UnionType)
        out[field.name] = args[0] if is_union and args else hint
    return out


def convert_value(cls: type[Policy], key: str, value):
    """Convert a CLI string to the type of field ``key`` of ``cls``."""
    types_ = field_types(cls)
    if key not in types_:
        raise TokensiftError(f"policy '{cls.name}' has no parameter '{key}'; it has: {', '.join(types_)}")
    if not isinstance(value, str):
        return value
    target = types_[key]
    try:
        if target is bool:
            if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(value)
            return value.lower() in ("true", "1", "yes")
        return target(value)
    except ValueError:
        raise TokensiftError(f"parameter '{key}' of policy '{cls.name}' must be {target.__name__}, got '{value}'") from None


def build_policy(name: str, **params) -> Policy:
    """Build a registered policy: ``build_policy("snapkv", budget=512)``."""
    cls = get_policy_class(name)
    kwargs = {k: convert_value(cls, k, v) for k, v in params.items() if v is not None}
    try:
        return cls(**kwargs)
    except TypeError as error:
        raise TokensiftError(f"cannot build policy '{name}': {error}") from None
