"""Shared pieces of visual-token selectors: the result type, budgets, similarity, scores.

A selector takes a batch of visual tokens ``[B, N, D]`` (optionally importance scores
``[B, N]``, per-layer [CLS] attention ``[L, B, N]``, text embeddings ``[B, T, D]``) and a
budget, and returns the kept token indices in original order. Merging methods also return the
merged token features at those indices and how many original tokens each one stands for.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from tokensift.errors import TokensiftError


@dataclass
class Selection:
    """Kept indices ``[B, k]`` (sorted, unique); for merging methods also ``tokens`` and ``sizes``."""

    indices: torch.Tensor
    tokens: torch.Tensor | None = None
    sizes: torch.Tensor | None = None

    def gather(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The kept tokens of ``x`` ``[B, N, D]`` (merged features where given) and their sizes."""
        kept = self.tokens if self.tokens is not None else gather_tokens(x, self.indices)
        sizes = self.sizes if self.sizes is not None else torch.ones(self.indices.shape, dtype=x.dtype, device=x.device)
        return kept, sizes.to(x.dtype)


def gather_tokens(x: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """``x[b, indices[b]]`` for ``x`` of shape ``[B, N, ...]``."""
    idx = indices.reshape(*indices.shape, *([1] * (x.dim() - 2))).expand(-1, -1, *x.shape[2:])
    return torch.gather(x, 1, idx)


def resolve_budget(n: int, budget: int | None = None, ratio: float | None = None) -> int:
    """Number of tokens to keep out of ``n``, from a count or a ratio in (0, 1)."""
    if (budget is None) == (ratio is None):
        raise TokensiftError("give exactly one of a budget (token count) or a keep ratio")
    if ratio is not None:
        if not 0 < ratio < 1:
            raise TokensiftError(f"keep ratio {ratio} must be in (0, 1); to keep everything, skip selection")
        return max(1, round(n * ratio))
    if int(budget) != budget or not 1 <= budget <= n:
        raise TokensiftError(f"budget {budget} must be a whole number of tokens between 1 and {n}")
    return int(budget)


def cosine_matrix(a: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """Cosine similarity ``[B, N, M]`` between token sets ``a`` ``[B, N, D]`` and ``b``."""
    a = F.normalize(a.float(), dim=-1)
    b = a if b is None else F.normalize(b.float(), dim=-1)
    return a @ b.transpose(1, 2)


def proxy_scores(tokens: torch.Tensor) -> torch.Tensor:
    """Importance when no [CLS] attention is given: attention of the mean token (a global query).

    Used where the encoder has no [CLS] token (e.g. Qwen2-VL) or scores were not recorded.
    """
    x = tokens.float()
    query = x.mean(dim=1, keepdim=True)
    return torch.softmax(query @ x.transpose(1, 2) / math.sqrt(x.shape[-1]), dim=-1)[:, 0]


def importance(tokens: torch.Tensor, scores: torch.Tensor | None, layer_scores: torch.Tensor | None) -> torch.Tensor:
    """``scores``, else the last layer of ``layer_scores``, else the proxy score: ``[B, N]``."""
    if scores is not None:
        return scores.float()
    if layer_scores is not None:
        return layer_scores[-1].float()
    return proxy_scores(tokens)


def topk_sorted(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` highest scores per row, in increasing index order (ties: lower index)."""
    order = torch.sort(scores.float(), dim=-1, descending=True, stable=True).indices[:, :k]
    return torch.sort(order, dim=-1).values


def greedy_farthest(dist: torch.Tensor, first: torch.Tensor, k: int) -> torch.Tensor:
    """Greedy max-min (farthest point) selection of ``k`` indices per row, from ``first`` ``[B]``."""
    B, N, _ = dist.shape
    rows = torch.arange(B, device=dist.device)
    chosen = torch.empty(B, k, dtype=torch.long, device=dist.device)
    chosen[:, 0] = first
    mindist = dist[rows, first].clone()
    mindist[rows, first] = -1.0
    for i in range(1, k):
        nxt = mindist.argmax(dim=-1)
        chosen[:, i] = nxt
        mindist = torch.minimum(mindist, dist[rows, nxt])
        mindist[rows, nxt] = -1.0
    return torch.sort(chosen, dim=-1).values


class SelectorBase:
    """Common interface: ``select(tokens, budget, scores=None, layer_scores=None, text=None)``.

    A selector is a dataclass whose fields are its hyper-parameters (``get_selector(name,
    **params)``); each one lists them in a numpy-style ``Parameters`` section. The budget
    (``budget`` or ``ratio``) is given per call, not per selector; the base has no parameters.
    """

    name: ClassVar[str] = ""
    merges: ClassVar[bool] = False
    uses_attention: ClassVar[bool] = False

    def select(self, tokens: torch.Tensor, budget: int, scores: torch.Tensor | None = None,
               layer_scores: torch.Tensor | None = None, text: torch.Tensor | None = None) -> Selection:
        """Choose ``budget`` tokens of ``tokens`` ``[B, N, D]``."""
        raise NotImplementedError

    def __call__(self, tokens: torch.Tensor, budget: int | None = None, ratio: float | None = None, **kw) -> Selection:
        """Resolve the budget (count or ratio), check it, and select."""
        if tokens.dim() != 3:
            raise TokensiftError(f"visual tokens must be [batch, tokens, dim], got shape {tuple(tokens.shape)}")
        k = resolve_budget(tokens.shape[1], budget, ratio)
        with torch.no_grad():
            return self.select(tokens, k, **kw)
