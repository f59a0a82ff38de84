"""GraphKV: select iteratively; each chosen token decays the scores of similar tokens."""

from dataclasses import dataclass

import torch

from tokensift.errors import TokensiftError
from tokensift.policies.base import Policy
from tokensift.policies.registry import register
from tokensift.policies.wrapper import Wrapper


@register
@dataclass
class GraphKV(Wrapper):
    """Wrapper: redundancy-aware selection over a cosine-similarity graph of the keys.

    "GraphKV: Breaking the Static Selection Paradigm with Graph-Based KV Cache Eviction"
    (2025). Tokens are nodes carrying the inner policy's scores; edges are the cosine
    similarities of their (per-head mean-centred) keys. Selection is greedy, ``step`` tokens
    per round: the protected tokens are selected first, then each round picks the highest
    current scores, and every selected token decays the score of each unselected token i to
    ``base_i * (1 - decay * max(0, max_sim(i, selected)))`` — a token similar to one already
    kept adds little. Only the similarity rows of selected tokens are computed (no ``n x n``
    matrix). The returned scores are each token's decayed score at the moment it was picked
    (non-increasing along the greedy order), so top-``budget`` reproduces the greedy choice
    and stays comparable across heads (usable inside ``adakv``).

    Parameters
    ----------
    inner : Policy, str or None, default "snapkv"
        The policy that gives each token its base score (a policy, a name or an expression).
    decay : float, default 0.5
        How much similarity to a selected token lowers a score, in [0, 1] (0: no decay).
    step : int, default 8
        Tokens selected per greedy round before the scores are decayed again.

    Plus the common parameters of :class:`~tokensift.policies.base.Policy`.
    """

    name = "graphkv"
    paper = "GraphKV: Breaking the Static Selection Paradigm with Graph-Based KV Cache Eviction (2025)"
    inner: Policy | str | None = "snapkv"  # the wrapped policy (a name or an expression)
    decay: float = 0.5
    step: int = 8

    def validate(self) -> None:
        super().validate()
        if not 0.0 <= self.decay <= 1.0 or self.step < 1:
            raise TokensiftError(f"graphkv: decay must be in [0, 1] and step >= 1 (got {self.decay}, {self.step})")

    def score(self, layer) -> torch.Tensor:
        base = positive(self.inner.score(layer).float(), layer.valid)
        budget = self.layer_budget(layer.depth, layer.depths, int(layer.valid_seen.max()))
        selected = layer.protected_mask() & layer.valid
        return greedy_decay(base, unit_keys(layer.keys, layer.valid), selected, layer.valid, budget, self.decay, self.step)


def positive(scores: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Shift each head's valid scores to be > 0 (order kept) so multiplicative decay lowers them."""
    low = scores.masked_fill(~valid, float("inf")).amin(dim=-1, keepdim=True)
    low = torch.where(torch.isfinite(low), low, torch.zeros_like(low))
    return (scores - low + 1e-6).masked_fill(~valid, 0.0)


def unit_keys(keys: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Keys centred on their per-head mean (real tokens only) and scaled to unit length."""
    weights = valid.float()[..., None]
    mean = (keys.float() * weights).sum(dim=2, keepdim=True) / weights.sum(dim=2, keepdim=True).clamp(min=1.0)
    return torch.nn.functional.normalize(keys.float() - mean, dim=-1)


def similarity_to(keys: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
    """``[batch, heads, n]``: each token's largest cosine to the tokens where ``chosen`` is True.

    Only the chosen tokens' rows are computed (``count x n``, not ``n x n``)."""
    count = int(chosen.sum(-1).max())
    if count == 0:
        return torch.full(chosen.shape, float("-inf"), device=keys.device)
    rows = chosen.float().topk(count, dim=-1).indices  # chosen positions first, [b, h, count]
    return similarity_to_rows(keys, rows, chosen.gather(-1, rows))


def similarity_to_rows(keys: torch.Tensor, rows: torch.Tensor, row_ok: torch.Tensor) -> torch.Tensor:
    """``[batch, heads, n]``: each token's largest cosine to the tokens at ``rows`` (``[b, h, r]``) where ``row_ok``."""
    row_keys = keys.gather(2, rows[..., None].expand(-1, -1, -1, keys.shape[-1]))
    sims = torch.matmul(row_keys, keys.transpose(-1, -2))  # [b, h, r, n]
    return sims.masked_fill(~row_ok[..., None], float("-inf")).amax(dim=2)


def greedy_decay(base, keys, selected, valid, budget: int, decay: float, step: int) -> torch.Tensor:
    """Greedy redundancy-aware selection; returns scores whose top-``budget`` is the greedy set."""
    closest = similarity_to(keys, selected).clamp(min=0.0)
    current = base * (1.0 - decay * closest)
    final = current.clone()
    available = valid & ~selected
    remaining = budget - int(selected.sum(-1).min())
    while remaining > 0 and bool(available.any()):
        take = min(step, remaining)
        candidates = current.masked_fill(~available, float("-inf"))
        picked = candidates.topk(min(take, candidates.shape[-1]), dim=-1).indices  # [b, h, take]
        picked_ok = available.gather(-1, picked)
        final.scatter_(-1, picked, torch.where(picked_ok, current.gather(-1, picked), final.gather(-1, picked)))
        available.scatter_(-1, picked, torch.zeros_like(picked_ok))
        closest = torch.maximum(closest, similarity_to_rows(keys, picked, picked_ok).clamp(min=0.0))
        current = torch.minimum(current, base * (1.0 - decay * closest))
        remaining -= take
    return torch.where(available, current, final).masked_fill(~valid, float("-inf"))
