"""The sketch's scores and a decode step's choice as compiled CPU loops (``sketch_kernel.cpp``),
with the ring read and write of low-bit sliding windows, built once per machine.

Eager PyTorch must expand the packed 2-bit codes into a float tensor before multiplying them
(:meth:`tokensift.storage.sketch.KeySketch.logits`); the compiled loop unpacks each byte in
registers and multiplies at once, about 5x faster on one core of the EPYC here. It is built with
the machine's own instruction set (``-march=native``) by PyTorch's extension loader the first
time a CPU sketch is scored (about a minute, logged), and cached under
``$TOKENSIFT_CACHE/kernels``. Where it cannot be built (no C++ compiler, no OpenMP), or with
``TOKENSIFT_NATIVE=0``, the eager path runs instead: the same numbers up to float rounding.
"""

from __future__ import annotations

import hashlib
import os
import platform
import sys
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("sketch_kernel.cpp")
FLAGS = ["-O3", "-march=native", "-fno-trapping-math", "-fopenmp"]
_loaded: dict[str, object] = {}


def wanted(tensor: torch.Tensor) -> bool:
    """Score this (CPU) tensor's sketch with the compiled loop, unless it is switched off."""
    return tensor.device.type == "cpu" and os.environ.get("TOKENSIFT_NATIVE", "1") != "0"


def build_name() -> str:
    """A name per source, flags, torch version and machine (a cached build never runs on another CPU)."""
    key = "|".join([SOURCE.read_text(), " ".join(FLAGS), torch.__version__, platform.machine(), _cpu_model()])
    return "tokensift_sketch_" + hashlib.sha256(key.encode()).hexdigest()[:16]


def _cpu_model() -> str:
    try:
        return next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
    except OSError:
        return platform.processor()


def module():
    """The compiled extension, or None where it cannot be built (said once on stderr)."""
    if "module" not in _loaded:
        _loaded["module"] = _build()
    return _loaded["module"]


def _build():
    from tokensift.models import cache_root
    from torch.utils.cpp_extension import load

    name = build_name()
    folder = cache_root() / "kernels" / name
    fresh = not any(folder.glob("*.so"))
    if fresh:
        print(f"tokensift: compiling the sketch kernel once for this machine (about a minute) -> {folder}", file=sys.stderr)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        return load(name=name, sources=[str(SOURCE)], extra_cflags=FLAGS, extra_ldflags=["-fopenmp"],
                    build_directory=str(folder), verbose=False)
    except Exception as error:  # noqa: BLE001 - any build failure means: use the eager path
        print(f"tokensift: the sketch kernel could not be built, scoring in eager PyTorch instead: "
              f"{str(error).splitlines()[0] if str(error) else type(error).__name__}", file=sys.stderr)
        return None


def scores(codes: torch.Tensor, weights: torch.Tensor, offset: torch.Tensor, bits: int) -> torch.Tensor | None:
    """``[batch, heads * rows, groups * group]`` scores (see the .cpp), or None without the kernel.

    ``codes`` uint8 ``[batch, heads, groups, width, group]`` (a view; each group's block contiguous),
    ``weights`` fp32 ``[batch, heads, groups, rows, dim]``, ``offset`` fp32 ``[batch, heads, groups, rows, 1]``."""
    compiled = module()
    if compiled is None:
        return None
    return compiled.sketch_scores(codes, weights.contiguous(), offset.squeeze(-1).contiguous(), bits)


def choose(codes: torch.Tensor, weights: torch.Tensor, offset: torch.Tensor, bits: int, k: int, sinks: int,
           forced_from: int, share: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """One sequence's decode-step choice in one call, or None without the kernel: ``(index``
    int64 ``[1, heads or q_heads, k]`` ascending, ``mass`` ``[1, q_heads, groups]`` the unread weight
    ``exp(logit - peak)`` per group, ``peak`` ``[1, q_heads, 1])``. Slots below ``sinks`` and from
    ``forced_from`` on are always chosen (at most ``k`` of them). Arguments as for :func:`scores`."""
    compiled = module()
    if compiled is None:
        return None
    return tuple(compiled.sketch_choose(codes, weights.contiguous(), offset.squeeze(-1).contiguous(), bits,
                                        k, sinks, forced_from, share))


def dequantize_ring(packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, start: int) -> torch.Tensor | None:
    """fp32 ``[batch, heads, n, dim]`` of a ring of grouped low-bit tokens (``packed`` uint8 ``[batch,
    heads, n, groups, bytes]``, fp16 ``scale``/``zero`` ``[batch, heads, n, groups, 1]``), token ``i``
    from slot ``(start + i) % n``: the eager dequantize's numbers, bit for bit. None without the kernel."""
    compiled = module() if wanted(packed) else None
    if compiled is None:
        return None
    return compiled.dequantize_ring(packed.contiguous(), scale.contiguous(), zero.contiguous(), bits, start)


def quantize_into_ring(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int,
                       slot: int, eps: float) -> bool:
    """Quantize ``x`` (``[batch, heads, 1, dim]``, one token per row) into ring slot ``slot`` in place,
    as :func:`tokensift.quant.quantize_tokens` does per group; False (nothing written) without the
    kernel or when the ring is not one contiguous block."""
    compiled = module() if wanted(packed) else None
    if compiled is None or not all(t.is_contiguous() for t in (packed, scale, zero)):
        return False
    compiled.quantize_into_ring(x.float().contiguous(), packed, scale, zero, bits, slot, eps)
    return True
