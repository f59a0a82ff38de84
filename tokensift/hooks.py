"""Model hooks for policies that need more than the attention call sees.

Transformers' attention functions never see the input token ids, but some policies do need
them (SepLLM keeps separator tokens). :func:`install_input_ids_hook` adds one forward
pre-hook to the model: before each forward whose ``past_key_values`` is a selecting cache,
it stores that forward's ``input_ids`` (``[batch, new]``, or None when the caller passed
embeddings) in ``cache.shared["input_ids"]``, where every layer of that cache can read it.
"""

from __future__ import annotations

import torch

HOOK_FLAG = "_tokensift_input_ids_hook"


def _record_input_ids(module, args, kwargs):
    from tokensift.cache import SelectingCache

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
