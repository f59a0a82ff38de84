"""Model hooks: what the attention function and the policies need beyond the attention call.

Transformers' attention functions are not given the cache (each attention module takes
``past_key_values`` as its own argument and keeps it), and never see the input token ids.

- :func:`install_cache_hooks` adds a forward pre-hook to each attention module (the innermost
  modules with a ``layer_idx`` whose ``forward`` takes ``past_key_values``): it records on the
  module (a weak reference) the selecting cache that call was given, or None. The attention
  function then finds its layer as ``cache.layers[module.layer_idx]`` (:func:`selecting_layer`),
  as kvpress's hooks find theirs from ``kwargs["past_key_values"]``.
- :func:`install_input_ids_hook` adds one forward pre-hook to the model: before each forward
  whose ``past_key_values`` is a selecting cache, it stores that forward's ``input_ids``
  (``[batch, new]``, or None when the caller passed embeddings) in ``cache.shared["input_ids"]``,
  where every layer of that cache can read it (SepLLM keeps separator tokens).
"""

from __future__ import annotations

import inspect
import weakref
from functools import partial

import torch

from tokensift.cache import SelectingCache, SelectingLayer

HOOK_FLAG = "_tokensift_input_ids_hook"
CACHE_HOOKS_FLAG = "_tokensift_cache_hooks"
CACHE_ATTR = "_tokensift_cache"  # on an attention module: weakref to the selecting cache of its current call


def _record_input_ids(module, args, kwargs):
    cache = kwargs.get("past_key_values")
    if not isinstance(cache, SelectingCache):
        return None
    ids = kwargs.get("input_ids", args[0] if args else None)
    cache.shared["input_ids"] = ids if isinstance(ids, torch.Tensor) else None
    return None


def install_input_ids_hook(model) -> bool:
    """Record each forward's input ids in its selecting cache (installed once per model).

    Returns True when this call installed it (False: it was already there).
    """
    if getattr(model, HOOK_FLAG, None) is not None:
        return False
    handle = model.register_forward_pre_hook(_record_input_ids, with_kwargs=True)
    object.__setattr__(model, HOOK_FLAG, handle)
    return True


def remove_input_ids_hook(model) -> None:
    """Remove the hook :func:`install_input_ids_hook` installed (no-op when there is none)."""
    handle = getattr(model, HOOK_FLAG, None)
    if handle is not None:
        handle.remove()
        object.__delattr__(model, HOOK_FLAG)


# ---------------------------------------------------------------- the cache of an attention call
def _cache_position(module) -> int | None:
    """Index of ``past_key_values`` among ``module.forward``'s positional parameters (None: there is none)."""
    if not isinstance(getattr(module, "layer_idx", None), int):
        return None
    try:
        parameters = list(inspect.signature(module.forward).parameters.values())
    except (TypeError, ValueError):
        return None
    for index, parameter in enumerate(parameters):
        if parameter.name == "past_key_values":
            return index
    return None


def attention_modules(model) -> list[torch.nn.Module]:
    """The attention modules of ``model``: the innermost modules with an int ``layer_idx`` whose
    ``forward`` takes ``past_key_values`` (a decoder layer that has both contains one of them)."""
    found = {module: position for module in model.modules() if (position := _cache_position(module)) is not None}
    return [
        module for module in found
        if not any(inner is not module and inner in found for inner in module.modules())
    ]


def _record_cache(module, args, kwargs, position: int):
    cache = kwargs.get("past_key_values", args[position] if len(args) > position else None)
    module.__dict__[CACHE_ATTR] = weakref.ref(cache) if isinstance(cache, SelectingCache) else None
    return None


def install_cache_hooks(model) -> bool:
    """Record, on each attention module, the selecting cache of its call (installed once per model).

    Returns True when this call installed them (False: they were already there).
    """
    if getattr(model, CACHE_HOOKS_FLAG, None) is not None:
        return False
    handles = [
        module.register_forward_pre_hook(partial(_record_cache, position=_cache_position(module)), with_kwargs=True)
        for module in attention_modules(model)
    ]
    object.__setattr__(model, CACHE_HOOKS_FLAG, handles)
    return True


def remove_cache_hooks(model) -> None:
    """Remove the hooks :func:`install_cache_hooks` installed (no-op when there are none)."""
    handles = getattr(model, CACHE_HOOKS_FLAG, None)
    if handles is None:
        return
    for handle in handles:
        handle.remove()
    object.__delattr__(model, CACHE_HOOKS_FLAG)
    for module in model.modules():
        module.__dict__.pop(CACHE_ATTR, None)


def selecting_layer(module) -> SelectingLayer | None:
    """The selecting layer of this attention call: ``cache.layers[module.layer_idx]`` of the
    selecting cache the module was given (None: no such cache, or a layer of transformers' own)."""
    ref = module.__dict__.get(CACHE_ATTR)
    cache = ref() if ref is not None else None
    if cache is None:
        return None
    layer = cache.layers[module.layer_idx]
    return layer if isinstance(layer, SelectingLayer) else None
