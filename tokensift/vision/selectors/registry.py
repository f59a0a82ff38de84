"""Registry of visual-token selectors by name."""

from __future__ import annotations

from tokensift.errors import TokensiftError

SELECTORS: dict[str, type] = {}


def register(cls: type) -> type:
    """Class decorator: register a selector dataclass under ``cls.name``."""
    SELECTORS[cls.name] = cls
    return cls


def selector_names() -> list[str]:
    """Registered selector names, sorted."""
    return sorted(SELECTORS)


def get_selector(name: str, **params):
    """An instance of the selector ``name`` with the given hyper-parameters."""
    if name not in SELECTORS:
        raise TokensiftError(f"unknown visual selector {name!r}; choose one of: {', '.join(selector_names())}")
    try:
        return SELECTORS[name](**params)
    except TypeError as exc:
        raise TokensiftError(f"bad parameters for selector {name!r}: {exc}") from None
