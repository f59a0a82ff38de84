"""Prefill policies (time to first token): ``full``, ``lazyllm``, ``gemfilter``."""

from tokensift.prefill import full, gemfilter, lazyllm  # noqa: F401  (registration)
from tokensift.prefill.base import PREFILLS, PrefillPolicy, build_prefill, register

__all__ = ["PREFILLS", "PrefillPolicy", "build_prefill", "register"]
