"""Building a selecting cache for a model: the one place that wires the engine together.

Imports run one way: policies <- tokens (the per-token store) <- cache (layers, storage) <-
hooks <- attention <- engine <- generate / speculative / serve / bench / cli. :func:`make_cache` switches the model to the
tokensift attention function, installs the hooks (the cache of each attention call, the input
ids of each forward) and builds the cache.
"""

from __future__ import annotations

from tokensift.attention import use_tokensift_attention
from tokensift.cache import SelectingCache
from tokensift.hooks import install_cache_hooks, install_input_ids_hook
from tokensift.policies.base import Policy


def make_cache(model, policy: Policy) -> SelectingCache:
    """A selecting cache for ``model``; switches the model to the tokensift attention function."""
    use_tokensift_attention(model)
    install_cache_hooks(model)  # each attention call finds its layer: cache.layers[module.layer_idx]
    install_input_ids_hook(model)  # cache.shared["input_ids"] for policies that read token ids
    cache = SelectingCache(model.config, policy)
    policy.prepare(model)  # once per cache, with the model (e.g. calibration)
    return cache
