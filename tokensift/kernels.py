"""Cheaper small-batch matrix multiplies for decoding on a CPU: prepacked oneDNN linears.

A decode or verification step multiplies a few rows (1 token, or a draft tree of 2..64) by
every weight matrix. PyTorch's default CPU path (MKL ``sgemm``) is slow for a few rows: on
the 2-core AMD EPYC here, 2 or 3 rows cost 2-3x one row and 8 rows 1.5x, so verifying a
tree costs far more than it should for a weight-bandwidth-bound model. oneDNN's inner
product on weights reordered once into its blocked layout (the path ``torch.compile`` takes
for frozen CPU linears) costs about the same for 1 to 8 rows.

:func:`packed_linears` swaps every ``nn.Linear`` of a model to that path for the duration
of a ``with`` block and restores the stock forward after it; the packed weights are built
once per model and kept on it (one extra copy of the linear weights). The results differ
from MKL's only by float rounding (~1e-5 relative), so greedy outputs stay identical in
practice; the speculative tests and the spec suite check it against stock plain decoding.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

PACKED_ATTRIBUTE = "_tokensift_packed_linears"


def packing_available(model) -> bool:
    """fp32 weights on the CPU and a PyTorch build with oneDNN."""
    weight = next(model.parameters())
    return torch.backends.mkldnn.is_available() and weight.device.type == "cpu" and weight.dtype == torch.float32


def _packed_forward(linear: torch.nn.Linear, packed: torch.Tensor):
    bias = linear.bias

    def forward(x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")

    return forward


def _packed_weights(model) -> dict[torch.nn.Linear, torch.Tensor]:
    packed = getattr(model, PACKED_ATTRIBUTE, None)
    if packed is None:
        with torch.no_grad():
            packed = {module: torch.ops.mkldnn._reorder_linear_weight(module.weight.detach())
                      for module in model.modules() if type(module) is torch.nn.Linear}
        object.__setattr__(model, PACKED_ATTRIBUTE, packed)  # not a submodule or parameter
    return packed


@contextmanager
def packed_linears(model, enabled: bool = True):
    """Run ``model``'s linear layers on prepacked oneDNN weights inside the block (no-op where
    unavailable or ``enabled`` is False)."""
    if not enabled or not packing_available(model):
        yield False
        return
    packed = _packed_weights(model)
    if any("forward" in vars(module) for module in packed):  # already inside such a block
        yield True
        return
    for module, weight in packed.items():
        module.forward = _packed_forward(module, weight)
    try:
        yield True
    finally:
        for module in packed:
            del module.forward  # back to the class's forward
