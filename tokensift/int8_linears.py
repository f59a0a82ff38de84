"""W8A8 linear layers for faster plain decoding on a CPU: int8 weights, int8 activations with
one scale per row, exact int32 products.

``--weights int8`` replaces every linear layer of the model (the output layer included) by
:class:`Int8Linear`: weights rounded to int8 with one scale per output channel, each input row
rounded to int8 with its own scale (its largest magnitude / 127), the product accumulated in
int32 by ``torch._int_mm`` and rescaled. Activation outliers (a few channels 20-50x larger than
the rest in SmolLM2) are moved into the weights first, as in SmoothQuant (Xiao et al., 2022,
"SmoothQuant: Accurate and Efficient Post-Training Quantization for Large Language Models"):
input channel ``j`` is divided by ``s_j = max|X_j|^a / max|W_j|^(1-a)`` (``a`` = 0.5) and the
weight's column ``j`` multiplied by it, with ``max|X_j|`` calibrated once on shipped text.

This is another model than the fp32 one: its greedy text can differ (SmolLM2: perplexity 20.2
against 19.9 on a shipped essay). Each output row depends on its own input row only (per-row
scales, exact integer sums; PyTorch's dynamic int8 linears quantize a whole batch on one scale),
but that is not enough for lossless speculation: the float parts around the layers (attention
over a tree against over one token) differ in the last bits, and the activation rounding turns
some of those differences into a different code. Measured on the spec-fresh prompts,
speculation reproduced plain decoding of this model in 4 of 25 generations, so the engine
refuses ``--speculate`` over it; plain decoding runs about 1.45x faster than fp32 here.
"""

from __future__ import annotations

import torch

from tokensift.errors import TokensiftError
from tokensift.exact_head import quantize_rows

SMOOTHING = 0.5  # SmoothQuant's migration strength a
CALIBRATION_TOKENS = 1024
QMAX = 127


def _row_scales(x: torch.Tensor) -> torch.Tensor:
    return x.abs().amax(-1, keepdim=True).clamp(min=1e-8) / QMAX


class RowQuantizer(torch.nn.Module):
    """Per-row int8 codes of a layer input (divided by the smoothing factors first), computed
    once for the ``users`` layers that read the same tensor (q/k/v, gate/up) and then dropped."""

    def __init__(self, smooth: torch.Tensor | None, users: int = 1):
        super().__init__()
        self.register_buffer("inverse_smooth", None if smooth is None else (1.0 / smooth).float())
        self.users = users
        self._input, self._codes, self._uses = None, None, 0

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if x is not self._input:  # a new input (held while in use, so its identity cannot be reused)
            rows = x.reshape(-1, x.shape[-1]).float()
            if self.inverse_smooth is not None:
                rows = rows * self.inverse_smooth
            scale = _row_scales(rows)
            self._input, self._codes, self._uses = x, ((rows / scale).round_().to(torch.int8), scale), 0
        codes, self._uses = self._codes, self._uses + 1
        if self._uses >= self.users:  # its last reader: do not keep activations alive
            self._input = self._codes = None
        return codes


class Int8Linear(torch.nn.Module):
    """A linear layer as int8 weights (per output channel) times int8 rows (per-row scales).

    Parameters
    ----------
    linear : torch.nn.Linear
        The layer to quantize (its weights are read, not kept).
    smooth : torch.Tensor or None
        Per-input-channel factors ``s_j`` (SmoothQuant): the weight's columns are multiplied by
        them before rounding, and the inputs divided by them (None: no smoothing).
    quantizer : RowQuantizer or None
        Shared with the other layers that read the same input, with the same ``smooth``
        (None: the layer's own).
    """

    def __init__(self, linear: torch.nn.Linear, smooth: torch.Tensor | None = None, quantizer: RowQuantizer | None = None):
        super().__init__()
        weight = linear.weight.detach().float()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        if smooth is not None:
            weight = weight * smooth[None, :]
        codes, scale = quantize_rows(weight)  # int8 [out, in], [out]
        self.register_buffer("codes_t", codes.t().contiguous())  # [in, out]: _int_mm's right operand
        self.register_buffer("scale", scale[None, :].contiguous())  # [1, out]
        self.quantizer = quantizer if quantizer is not None else RowQuantizer(smooth)
        self.bias = None if linear.bias is None else torch.nn.Parameter(linear.bias.detach().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        codes, row_scale = self.quantizer(x)
        out = self._int_mm(codes).float() * row_scale * self.scale
        if self.bias is not None:
            out = out + self.bias.float()
        return out.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def _int_mm(self, codes: torch.Tensor) -> torch.Tensor:
        count = codes.shape[0]
        if codes.device.type == "cuda" and count <= 16:  # cuBLASLt's int8 product needs more than 16 rows
            codes = torch.cat([codes, codes.new_zeros(17 - count, codes.shape[1])])
        return torch._int_mm(codes, self.codes_t)[:count]

    @property
    def nbytes(self) -> int:
        return sum(buffer.nbytes for buffer in self.buffers())


def has_int8_linears(model) -> bool:
    return any(isinstance(module, Int8Linear) for module in model.modules())


def _linears(model, include_head: bool) -> dict[str, torch.nn.Linear]:
    head = model.get_output_embeddings()
    return {name: module for name, module in model.named_modules()
            if type(module) is torch.nn.Linear and (include_head or module is not head)}


@torch.inference_mode()
def observe_inputs(model, ids: torch.Tensor, linears: dict[str, torch.nn.Linear]) -> tuple[dict, list[list[str]]]:
    """One forward of ``ids``: ``max |x_j|`` of every input channel of every layer in ``linears``,
    and the groups of layers that read the same input tensor (in the order first seen)."""
    maxima: dict[str, torch.Tensor] = {}
    readers: dict[int, list[str]] = {}
    inputs = []  # held until the end, so that no two inputs share an id

    def hook(name):
        def record(_module, args):
            x = args[0]
            seen = x.detach().abs().reshape(-1, x.shape[-1]).amax(0).float()
            maxima[name] = seen if name not in maxima else torch.maximum(maxima[name], seen)
            if not any(name in group for group in readers.values()):
                inputs.append(x)
                readers.setdefault(id(x), []).append(name)
        return record

    handles = [module.register_forward_pre_hook(hook(name)) for name, module in linears.items()]
    try:
        model(input_ids=ids)
    finally:
        for handle in handles:
            handle.remove()
    return maxima, list(readers.values())


def calibration_ids(tokenizer, device) -> torch.Tensor:
    """Shipped text (Paul Graham essays that the spec suite and its held-out split do not use)."""
    from tokensift.speculative.warm import TRAIN_ESSAYS, long_essays

    essays = long_essays()
    text = "\n\n".join(essays[i] for i in TRAIN_ESSAYS[:2])
    ids = tokenizer(text)["input_ids"][:CALIBRATION_TOKENS]
    return torch.tensor([ids], device=device)


def smoothing_factors(maximum_x: torch.Tensor, weights, strength: float = SMOOTHING) -> torch.Tensor:
    """SmoothQuant's ``s_j = max|X_j|^a / max|W_j|^(1-a)``, ``max|W_j|`` over every weight in
    ``weights`` (a tensor or the layers sharing the input); 1 where a channel never fired."""
    weights = [weights] if isinstance(weights, torch.Tensor) else list(weights)
    maximum_w = torch.stack([w.detach().abs().amax(0).float() for w in weights]).amax(0).clamp(min=1e-5)
    factors = maximum_x.clamp(min=1e-5).pow(strength) / maximum_w.pow(1 - strength)
    return torch.where(maximum_x > 0, factors, torch.ones_like(factors)).clamp(min=1e-2, max=1e2)


def int8_available(model) -> bool:
    """Whether ``torch._int_mm`` runs on the model's device (CPU and CUDA builds have it)."""
    device = next(model.parameters()).device
    try:
        torch._int_mm(torch.ones(17, 8, dtype=torch.int8, device=device), torch.ones(8, 8, dtype=torch.int8, device=device))
    except (RuntimeError, NotImplementedError):
        return False
    return True


def quantize_linears(model, calibration: torch.Tensor | None = None, *, include_head: bool = True) -> int:
    """Replace ``model``'s linear layers by :class:`Int8Linear` in place; returns how many.

    One forward over ``calibration`` (token ids ``[1, n]``) finds which layers read the same
    input (they share one :class:`RowQuantizer`) and the inputs' channel maxima for
    SmoothQuant's factors; None: a 4-token forward for the groups only, no smoothing."""
    if not int8_available(model):
        raise TokensiftError("int8 weights need torch._int_mm on this device (CPU or CUDA)")
    linears = _linears(model, include_head)
    device = next(model.parameters()).device
    ids = calibration if calibration is not None else torch.tensor([[1, 2, 3, 4]], device=device)
    maxima, groups = observe_inputs(model, ids, linears)
    grouped = {name for group in groups for name in group}
    groups += [[name] for name in linears if name not in grouped]  # layers the forward never reached
    for group in groups:
        layers = [linears[name] for name in group]
        smooth = None
        if calibration is not None and group[0] in maxima:
            smooth = smoothing_factors(torch.stack([maxima[name] for name in group]).amax(0), [m.weight for m in layers])
        quantizer = RowQuantizer(smooth, users=len(group))
        for name, linear in zip(group, layers):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, Int8Linear(linear, smooth, quantizer))
    return len(linears)
