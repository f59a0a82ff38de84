"""Devices and dtypes: parse what the user names, find where a model lives, time honestly.

Everything tokensift creates is placed on the model's device (``model_device``). Timers call
:func:`clock`, which waits for queued device work first (CUDA and other asynchronous
devices), so a measured interval covers the work and not only its launch.
"""

from __future__ import annotations

import time

import torch

from tokensift.errors import TokensiftError

DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    """``"bf16"``, ``"bfloat16"``, ``torch.bfloat16``... -> a torch dtype (None: float32)."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        if not dtype.is_floating_point:
            raise TokensiftError(f"dtype {dtype} is not a floating-point type; use one of: float32, bfloat16, float16")
        return dtype
    name = str(dtype).strip().lower().removeprefix("torch.")
    if name not in DTYPES:
        raise TokensiftError(f"unknown dtype '{dtype}'; use one of: float32, bfloat16, float16 (or fp32, bf16, fp16)")
    return DTYPES[name]


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"``, ``"auto"`` (CUDA when available) -> a device
    that exists here (None: the CPU)."""
    if device is None:
        return torch.device("cpu")
    if isinstance(device, str) and device.strip().lower() == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device.strip() if isinstance(device, str) else device)
    except (RuntimeError, TypeError):
        raise TokensiftError(f"unknown device '{device}'; use cpu, cuda, cuda:N, mps or auto") from None
    if not device_available(resolved):
        raise TokensiftError(f"device '{device}' is not available on this machine; use cpu or auto")
    return resolved


def device_available(device: torch.device) -> bool:
    """Whether ``device`` can hold tensors in this process."""
    if device.type == "cpu":
        return True
    if device.type == "cuda":
        return torch.cuda.is_available() and (device.index is None or device.index < torch.cuda.device_count())
    if device.type == "mps":
        return torch.backends.mps.is_available()
    backend = getattr(torch, device.type, None)
    return bool(backend is not None and getattr(backend, "is_available", lambda: False)())


def model_device(model) -> torch.device:
    """The device of the model's first parameter (where its inputs must go)."""
    return next(model.parameters()).device


def synchronize(device: torch.device | str | None) -> None:
    """Wait for the work queued on ``device`` (a no-op on the CPU, or for None)."""
    if device is None:
        return
    device = torch.device(device)
    if device.type == "cpu":
        return
    backend = getattr(torch, device.type, None)
    sync = getattr(backend, "synchronize", None)
    if sync is not None:
        sync()


def clock(device: torch.device | str | None = None) -> float:
    """``time.perf_counter()`` after the device's queued work is done (use for every timer)."""
    synchronize(device)
    return time.perf_counter()


def run_fields(model) -> dict:
    """``{"device": "cuda:0", "dtype": "bfloat16"}`` of a loaded model, for result rows."""
    parameter = next(model.parameters())
    return {"device": str(parameter.device), "dtype": str(parameter.dtype).removeprefix("torch.")}
