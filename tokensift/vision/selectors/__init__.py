"""Visual-token selectors, one file each, registered by name."""

from . import dart, divprune, fastervlm, gprune, mmtok, random_select, todre, tome, uniform, visionzip, vtc_cls  # noqa: F401
from .base import Selection, SelectorBase, gather_tokens, resolve_budget
from .registry import SELECTORS, get_selector, register, selector_names

__all__ = ["SELECTORS", "Selection", "SelectorBase", "gather_tokens", "get_selector", "register",
           "resolve_budget", "selector_names"]
