"""KV policies, one per file, registered by name."""

from tokensift.policies import a2sf, full, h2o, knorm, random, snapkv, streaming_llm, tova  # noqa: F401
from tokensift.policies import (  # noqa: F401  query-aware sparse reading
    hisa, lessismore, recycled_attention, tidaldecode, tokenselect, topk_attention,
)
from tokensift.policies import adakv, caote, fasa, graphkv, pyramidkv, sepllm, vatp, zipcache  # noqa: F401  seed eviction methods
from tokensift.policies import tiered  # noqa: F401  small caches: sketch + second tier
from tokensift.policies.base import Policy
from tokensift.policies.registry import POLICIES, build_policy, get_policy_class, register

__all__ = ["POLICIES", "Policy", "build_policy", "get_policy_class", "register"]
