"""An exact greedy output layer from an int8 copy of its weight.

SmolLM2-135M's output layer (576 -> 49152, fp32) reads 113 MB per decode step, more than the
30 decoder layers' linears together. Greedy decoding needs only its argmax, and an int8 copy
of the weight can say which few rows can hold it:

1. **Approximate logits** ``a = x̂ Ŵᵀ`` for every vocabulary entry in int8 with fbgemm's
   quantized linear (``quantized::linear_with_input_q_dq_qweight_dq_output_fp32``: int8
   weights, activations quantized with a scale we give, fp32 output). The weight rows are
   quantized once, symmetric per row: ``Ŵ_v = s_v q_v``, ``s_v = max|W_v| / 127``. The
   activations are quantized here, in two levels with power-of-two scales, so that fbgemm's own
   quantization of what it is handed is exact: ``x = s (p1 + p2 / 64) + δ`` with ``s`` the
   power of two with ``max|x| / s <= 63`` (per row; rows are stretched by powers of two to the
   kernel's one scale), ``p1 = round(x / s)``, ``p2 = round(64 (x - s p1) / s)``
   (``|p1| <= 63``, ``|p2| <= 32``: 7-bit values, which fbgemm's non-VNNI kernels cannot saturate)
   and ``|δ| <= s / 128``; ``δ`` is known exactly (every step is exact in fp32). The two levels go
   through the kernel as two rows at scale ``s``; ``a = y1 + y2 / 64``. Integer sums are exact,
   dequantizing rounds once.
2. **A rigorous per-entry bound** on ``|e_v - a_v|``, where ``e_v`` is any fp32 evaluation of
   the exact logit ``x · W_v``::

       e_v - a_v = x · (W_v - Ŵ_v) + δ · Ŵ_v                              (exactly)
       |x · (W_v - Ŵ_v)| <= ||x||_1 s_v / 2                               (round to nearest)
       |δ · Ŵ_v|         <= ||δ||_inf ||Ŵ_v||_1
       |fl(x · W_v) - x · W_v| <= γ_k Σ|x_i||W_vi| <= γ_k ||x||_1 127 s_v   (k-term fp32 sum, any order)

   with ``γ_k = k u / (1 - k u)``, ``u = 2^-24``, ``k`` the hidden size. ``b_v`` is their sum
   times ``1 + 1e-3`` (the fp32 arithmetic of quantizing the weight and of the bound itself),
   plus ``16 u`` times a bound on ``|a| + b`` (the rounding of ``a`` and of ``a ± b``).
   Rows with large ``s_v`` (rare tokens) get wide bounds, frequent ones narrow: on SmolLM2
   ``b_v`` is ~1-5 logits in the worst case (the real error is ~10x smaller).
3. **Candidates** are the entries with ``a_v + b_v >= L = max_u (a_u - b_u)`` (a lower bound on
   the exact maximum): for ``u`` outside, ``e_u <= a_u + b_u < L <= max e``. (With one bound
   ``B`` for every entry this is ``a_v >= max(a) - 2B``.) On SmolLM2: a median of 1-6, at most
   ~50 of 49152 entries.
4. **Exact logits** of the candidates only (their fp32 weight rows gathered), written over the
   approximate ones. Every other entry ``u`` keeps ``a_u < L <= max e``: strictly below the
   exact maximum, so the row's argmax is the fp32 argmax (ties within fp32 rounding of two
   evaluation orders aside, as with the prepacked kernels), and every entry is within ``b_v``
   of its exact value (drafters reading the top-k of a row get good guesses). More than
   ``max_candidates`` candidates, or a non-finite hidden state: the full fp32 row instead.

Why this kernel: PyTorch's dynamic int8 linear (``quantized::linear_dynamic``) is a little
faster but quantizes activations per tensor in 8 bits on a scale it picks; SmolLM2's final hidden
states have outlier channels (max|x| ~20-50 against a mean |x| of ~1), so its error is ~1.5 logits
and its bound ~20: every entry a candidate. ``aten._weight_int8pack_mm`` (fp32 activations) has no
fast fp32 path on this build (23 ms a row, 3x the fp32 layer); ``torch._int_mm`` and oneDNN's
``qlinear_pointwise`` are 2-3x slower than fbgemm here. ``benchmarks/exact_head_kernels.py``
times them all.

The rows are **not** full logits: only their argmax is exact. :func:`exact_greedy_head` swaps
them in; ``generate(..., exact_int8_head=True)`` and ``Speculator(..., exact_int8_head=True)``
(``tokensift generate --exact-int8-head``) do so only for greedy decoding: with sampling
(temperature > 0, top-k/top-p) or a repetition penalty they **fall back** to the full fp32 layer,
silently, with the same output as without the flag; so do models whose output layer is not an
fp32 CPU ``nn.Linear``. The speculative verifier approximates the rows along the draft tree's
likeliest path in one int8 call (one read of the weight), a longer batch each time the walk goes
past them. A logit scale or soft-cap applied after the layer (Gemma) is monotone and keeps the
argmax (up to ties its saturation makes). The int8 copy (28 MB for SmolLM2) is built on first
use and kept on the model: changing the weights afterwards needs a new model object.
"""

from __future__ import annotations

import math
import warnings
from contextlib import contextmanager

import torch

EXACT_ATTRIBUTE = "_tokensift_exact_head"
UNIT_ROUNDOFF = 2.0 ** -24
SAFETY = 1e-3  # relative slack for the fp32 arithmetic of quantizing the weight and of the bound
LEVEL = 63  # |p1| <= 63: activations in 7 bits (with the zero point at 64, in [1, 127])
SUBLEVEL = 64  # the second level's step: s / 64 (|p2| <= 32)
ZERO_POINT = 64
SMALLEST_SCALE = 2.0 ** -40  # floor of the activation scale (an all-zero hidden state)
BLOCK = 128  # entries per block when looking for candidates


def gamma(terms: int) -> float:
    """Relative error bound ``γ_k`` of a ``k``-term fp32 dot product, in any summation order."""
    return terms * UNIT_ROUNDOFF / (1 - terms * UNIT_ROUNDOFF)


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8: ``(q [vocab, hidden] int8 in [-127, 127], scale [vocab] fp32)``."""
    scale = (weight.abs().amax(dim=1) / 127).clamp(min=torch.finfo(torch.float32).tiny)
    q = torch.round(weight / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def activation_scale(largest: float) -> float:
    """The power of two ``s`` with ``largest / s <= 63`` (the first level's step)."""
    scale = max(math.ldexp(1.0, math.ceil(math.log2(largest / LEVEL))) if largest > 0 else 0.0, SMALLEST_SCALE)
    while largest / scale > LEVEL:  # log2's rounding
        scale *= 2
    return scale


def quantize_activations(hidden: torch.Tensor) -> tuple[torch.Tensor, float, torch.Tensor, torch.Tensor, list[float]]:
    """Two levels per row on power-of-two scales: ``(levels [2 * rows, hidden], S, stretch
    [rows, 1], δ [rows, hidden], s [rows])``. Row ``r`` has its own scale ``s_r``; the kernel takes
    one, ``S = max s_r``, so row ``r`` goes in stretched by ``S / s_r`` (a power of two: exact):
    ``levels = S * [p1; p2]`` and ``hidden * stretch = S * (p1 + p2 / 64) + δ * stretch``, all exact."""
    scales = [activation_scale(largest) for largest in hidden.abs().amax(dim=-1).tolist()]
    top = max(scales)
    stretch = torch.tensor([top / scale for scale in scales], dtype=hidden.dtype, device=hidden.device)[:, None]
    stretched = hidden * stretch
    first = torch.round(stretched / top)
    residual = stretched - first * top  # exact (Sterbenz)
    second = torch.round(residual * (SUBLEVEL / top))
    remainder = (residual - second * (top / SUBLEVEL)) / stretch  # exact
    return torch.cat([first, second]).mul_(top), top, stretch, remainder, scales


def block_maxima(row: torch.Tensor) -> torch.Tensor:
    """The largest entry of each block of ``BLOCK`` consecutive entries of ``row`` (the last block may be short)."""
    whole = row.shape[0] // BLOCK * BLOCK
    maxima = row[:whole].view(-1, BLOCK).amax(dim=1)
    return maxima if whole == row.shape[0] else torch.cat([maxima, row[whole:].amax().reshape(1)])


def available(linear) -> bool:
    """An ``nn.Linear`` with fp32 CPU weights and a PyTorch build with fbgemm's int8 kernels."""
    return (isinstance(linear, torch.nn.Linear) and linear.weight.device.type == "cpu"
            and linear.weight.dtype == torch.float32 and torch.backends.quantized.engine in ("x86", "fbgemm")
            and hasattr(torch.ops.quantized, "linear_with_input_q_dq_qweight_dq_output_fp32"))


def applies(temperature: float, repetition_penalty: float = 1.0) -> bool:
    """Whether the next token is a plain argmax of the logits (what the exact head gives)."""
    return temperature <= 0 and repetition_penalty == 1.0


class ExactGreedyHead:
    """An output layer whose rows have the exact fp32 argmax, computed mostly in int8.

    Calling it on hidden states ``[..., hidden]`` returns ``[..., vocab]`` rows: exact fp32
    logits on the candidates that can hold the maximum, int8 approximations (within their
    bound, below the maximum) elsewhere. See the module docstring for the bound.

    Parameters
    ----------
    weight : torch.Tensor
        The fp32 output weight ``[vocab, hidden]`` (kept by reference: candidates' exact rows
        are gathered from it).
    bias : torch.Tensor or None, default None
        The output bias ``[vocab]``, if the layer has one.
    max_candidates : int, default 4096
        More candidates than this in a row (a flat distribution): that row is computed in full
        fp32 instead.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, max_candidates: int = 4096):
        with torch.no_grad():
            self.weight = weight.detach()
            self.bias = None if bias is None else bias.detach()
            self.max_candidates = max_candidates
            q, scale = quantize_rows(self.weight)
            zeros = torch.zeros(scale.shape, dtype=torch.long)
            with warnings.catch_warnings():  # quantized tensors are deprecated (PyTorch 2.13) but still the way in
                warnings.simplefilter("ignore", UserWarning)
                qweight = torch._make_per_channel_quantized_tensor(q, scale.double(), zeros, 0)
            self.packed = torch.ops.quantized.linear_prepack(qweight, None)  # the bias once, after the two levels
            # b_v = ||x||_1 * weight_term_v + ||δ||_inf * activation_term_v (+ a row's rounding slack)
            terms = self.weight.shape[1]
            self.weight_term = (scale.double() * (0.5 + 127 * gamma(terms)) * (1 + SAFETY)).float()
            row_l1 = q.abs().sum(dim=1, dtype=torch.int32).double() * scale.double()  # ||Ŵ_v||_1
            self.activation_term = (row_l1 * (1 + SAFETY)).float()
            self.largest_weight_term = float(self.weight_term.max())
            self.largest_row_l1 = float(row_l1.max())
            self.bias_l1 = 0.0 if self.bias is None else float(self.bias.abs().max())
            self.offsets = torch.arange(BLOCK)
            self.rows = self.full_rows = self.candidate_rows = 0  # diagnostics: rows seen, computed in full
            # fp32 (too many candidates, non-finite input), and candidates summed over the other rows

    def approximate(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[float]]:
        """int8 logits of ``hidden`` ``[rows, hidden]`` (fp32, finite): ``(approx [rows, vocab],
        δ [rows, hidden], s [rows])`` (see the module docstring)."""
        levels, top, stretch, remainder, scales = quantize_activations(hidden)
        rows = hidden.shape[0]
        out = torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32(levels, top, ZERO_POINT, self.packed)
        approx = out[:rows].add_(out[rows:], alpha=1 / SUBLEVEL)
        if rows > 1 and bool((stretch != 1).any()):
            approx.div_(stretch)  # a power of two: exact
        return (approx if self.bias is None else approx.add_(self.bias)), remainder, scales

    def row_terms(self, hidden: torch.Tensor, remainder: torch.Tensor, scales: list[float]) -> list[tuple[float, float, float]]:
        """Per row of ``hidden`` ``[rows, hidden]``: ``(||x||_1, ||δ||_inf, slack)``, the numbers
        every entry's bound is made of (:meth:`entry_bounds`)."""
        l1, delta = hidden.abs().sum(dim=-1).tolist(), remainder.abs().amax(dim=-1).tolist()
        largest = hidden.abs().amax(dim=-1).tolist()
        terms = []
        for norm, residual, top, scale in zip(l1, delta, largest, scales):
            widest = norm * self.largest_weight_term + residual * self.largest_row_l1
            reach = (top + scale) * self.largest_row_l1 + self.bias_l1  # |a_v| <= ||x̂||_inf ||Ŵ_v||_1 + |bias_v|
            terms.append((norm, residual, 16 * UNIT_ROUNDOFF * (reach + widest) * (1 + SAFETY)))
        return terms

    def entry_bounds(self, terms: tuple[float, float, float], index: torch.Tensor | None = None) -> torch.Tensor:
        """``b_v`` of one row for the entries ``index`` (None: all): ``|e_v - approx_v| <= b_v``."""
        norm, residual, slack = terms
        weight_term = self.weight_term if index is None else self.weight_term.index_select(0, index)
        activation_term = self.activation_term if index is None else self.activation_term.index_select(0, index)
        return torch.add(weight_term * norm, activation_term, alpha=residual).add_(slack)

    def candidates(self, approx_row: torch.Tensor, terms: tuple[float, float, float]) -> torch.Tensor:
        """Indices (ascending) of the entries of one row that can hold its exact maximum:
        ``a_v + b_v >= max_u (a_u - b_u)``. One pass over the row (maxima of blocks of 128
        entries); the rest runs on the few blocks that reach the widest bound below the top."""
        maxima = block_maxima(approx_row)
        start = int(maxima.argmax()) * BLOCK
        top = (start + approx_row[start:start + BLOCK].argmax()).reshape(1)
        floor = float(approx_row[top] - self.entry_bounds(terms, top))  # <= the exact maximum
        norm, residual, slack = terms
        widest = norm * self.largest_weight_term + residual * self.largest_row_l1 + slack
        blocks = torch.nonzero(maxima >= floor - widest).squeeze(-1)  # hold every u with a_u + b_u >= floor
        near = (blocks[:, None] * BLOCK + self.offsets).flatten()
        near = near[near < approx_row.shape[0]] if near[-1] >= approx_row.shape[0] else near
        values, bounds = approx_row.index_select(0, near), self.entry_bounds(terms, near)
        return near[values + bounds >= (values - bounds).max()]

    def exact_row(self, hidden_row: torch.Tensor) -> torch.Tensor:
        """The full fp32 row (the fallback)."""
        self.full_rows += 1
        return torch.nn.functional.linear(hidden_row, self.weight, self.bias)

    def refine(self, hidden_row: torch.Tensor, approx_row: torch.Tensor, terms: tuple[float, float, float]) -> torch.Tensor:
        """``approx_row`` (in place) with its candidates' exact logits written in (the whole row
        exact when there are too many)."""
        index = self.candidates(approx_row, terms)
        if index.numel() > self.max_candidates:
            return approx_row.copy_(self.exact_row(hidden_row))
        self.candidate_rows += index.numel()
        bias = None if self.bias is None else self.bias.index_select(0, index)
        exact = torch.nn.functional.linear(hidden_row, self.weight.index_select(0, index), bias)
        return approx_row.index_copy_(0, index, exact)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """Rows with the exact argmax for hidden states ``[..., hidden]`` -> ``[..., vocab]``."""
        flat = hidden.reshape(-1, hidden.shape[-1]).float()
        self.rows += flat.shape[0]
        if not bool(torch.isfinite(flat).all()):
            return torch.stack([self.exact_row(row) for row in flat]).reshape(*hidden.shape[:-1], -1)
        approx, remainder, scales = self.approximate(flat)
        for row, terms in enumerate(self.row_terms(flat, remainder, scales)):
            self.refine(flat[row], approx[row], terms)
        return approx.reshape(*hidden.shape[:-1], -1)

    __call__ = forward

    def argmax(self, hidden: torch.Tensor) -> torch.Tensor:
        """The fp32 greedy token of each row of ``hidden`` ``[..., hidden]``."""
        return self.forward(hidden).argmax(dim=-1)


def exact_head(model) -> ExactGreedyHead:
    """The model's :class:`ExactGreedyHead` (built on first use, kept on the model)."""
    head = getattr(model, EXACT_ATTRIBUTE, None)
    if head is None:
        linear = model.get_output_embeddings()
        head = ExactGreedyHead(linear.weight, linear.bias)
        object.__setattr__(model, EXACT_ATTRIBUTE, head)  # not a submodule or parameter
    return head


@contextmanager
def exact_greedy_head(model, enabled: bool = True):
    """Inside the block, the model's output layer returns :class:`ExactGreedyHead` rows (exact
    argmax only: use it for greedy decoding). Yields the head, or None where it is off or
    unavailable (not an fp32 CPU ``nn.Linear``, no int8 kernels); nested blocks reuse it."""
    linear = model.get_output_embeddings()
    if not enabled or not available(linear):
        yield None
        return
    head = exact_head(model)
    previous = vars(linear).get("forward")  # packed_linears' forward, say
    if getattr(previous, "__self__", None) is head:  # already inside such a block
        yield head
        return
    linear.forward = head.forward
    try:
        yield head
    finally:
        if previous is None:
            del linear.forward  # back to the class's forward
        else:
            linear.forward = previous
