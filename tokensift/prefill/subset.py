"""The machinery every pruning prefill shares: score tokens by the last token's attention, carry
a subset of tokens through the remaining layers at their true positions, and leave a cache that
decoding, any KV policy and speculation read as if the pruned tokens had been evicted.

How a subset reaches stock transformers layers (no model code patched): a forward pre-hook on
each decoder layer from the first pruning layer on cuts the hidden states to the kept tokens and
cuts what the model computed for the whole prompt the same way (the 4D mask, RoPE cos/sin,
position ids), so every kept token keeps its true position and its true mask row (sliding
windows count true distances). The selecting cache's layers read the kept tokens' true positions
from ``cache.shared[SUBSET]`` (``SelectingLayer.update``); transformers' sliding-window layers are
told the true length afterwards (:func:`finish`). Batch of one.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch

from tokensift import attention
from tokensift.cache import SUBSET, SelectingCache, SelectingLayer
from tokensift.errors import TokensiftError


@dataclass
class Subset:
    """The tokens the current layer computes: their true positions (1D, sorted) among ``total``."""

    positions: torch.Tensor
    total: int


class StopForward(Exception):
    """Raised by the score watch after its last layer: the rest of that forward is not needed."""


# ------------------------------------------------------------------ the model's shape
def decoder_layers(model) -> torch.nn.ModuleList:
    return model.get_decoder().layers


def layer_types(model) -> list[str]:
    config = model.config.get_text_config(decoder=True)
    return list(getattr(config, "layer_types", None) or ["full_attention"] * config.num_hidden_layers)


def sliding_window(model) -> int:
    """The sliding window of the model's sliding-window layers (0 when it has none)."""
    if "sliding_attention" not in layer_types(model):
        return 0
    return int(model.config.get_text_config(decoder=True).sliding_window or 0)


def layer_index(value: float, layers: int, name: str) -> int:
    """A layer given as an index (>= 1) or as a fraction of the depth (< 1), checked: 1 .. layers-1."""
    index = int(round(value * layers)) if 0 < value < 1 else int(value)
    if value != int(value) and value >= 1 or not 1 <= index < layers:
        raise TokensiftError(f"{name}: layer {value} is outside 1..{layers - 1} (or a fraction of the depth in (0, 1))")
    return index


def check_cache(cache) -> None:
    """Pruned prefill needs an empty tokensift cache whose layers take tokens at true positions."""
    if not isinstance(cache, SelectingCache):
        raise TokensiftError("a pruning prefill needs a tokensift SelectingCache (make_cache)")
    for layer in cache.layers:
        if isinstance(layer, SelectingLayer) and not layer.subset_prefill:
            raise TokensiftError(f"policy '{cache.policy.name}' stores every token with implicit positions; "
                                 "it does not compose with a pruning prefill (use --prefill full)")
    if cache.get_seq_length():
        raise TokensiftError("a pruning prefill needs an empty cache (it prefills the whole prompt)")


# ------------------------------------------------------------------------ scoring
def last_token_attention(query: torch.Tensor, key: torch.Tensor, scaling: float, rows: int = 1) -> torch.Tensor:
    """``[batch, kv]``: softmax attention of the last ``rows`` queries over ``key``, averaged over
    every query head (and those rows); GQA-aware, causal among the rows, never a full matrix."""
    batch, heads, q_len, dim = query.shape
    kv_heads, kv = key.shape[1], key.shape[2]
    rows = min(rows, q_len)
    last = query[:, :, -rows:].float().reshape(batch, kv_heads, heads // kv_heads * rows, dim)
    logits = last @ key.float().transpose(-1, -2) * scaling
    if rows > 1:  # row r is query q_len - rows + r: it sees keys up to kv - rows + r
        row = torch.arange(rows, device=key.device).repeat(heads // kv_heads)
        later = torch.arange(kv, device=key.device)[None, :] > (kv - rows + row)[:, None]
        logits = logits.masked_fill(later, float("-inf"))
    return logits.softmax(dim=-1).mean(dim=(1, 2))


class ScoreWatch:
    """Records, at chosen layers, the last tokens' attention over the tokens that layer computes
    (scattered to true positions; -inf where absent). ``stop_after``: abort the forward there."""

    def __init__(self, layers: set[int], subset: Subset, rows: int = 1, stop_after: int | None = None):
        self.layers, self.subset, self.rows, self.stop_after = layers, subset, rows, stop_after
        self.scores: dict[int, torch.Tensor] = {}

    def __call__(self, module, query, key, scaling) -> None:
        index = getattr(module, "layer_idx", None)
        if index in self.layers:
            scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
            score = last_token_attention(query, key[:, :, -query.shape[2]:], scaling, self.rows)[0]
            full = torch.full((self.subset.total,), float("-inf"), device=score.device)
            self.scores[index] = full.index_put_((self.subset.positions,), score)
        if index is not None and index == self.stop_after:
            raise StopForward


@contextmanager
def watching(watch: ScoreWatch):
    """Install ``watch`` on the tokensift attention function for the duration."""
    attention.PREFILL_WATCH[0] = watch
    try:
        yield watch
    finally:
        attention.PREFILL_WATCH[0] = None


def top_tokens(scores: torch.Tensor, keep: int, protect: int, span: int = 0) -> torch.Tensor:
    """Sorted indices of the ``keep`` best of ``scores`` (1D), the last ``protect`` always among them;
    with ``span`` > 0 each chosen token brings up to ``span`` neighbours on either side (nearest first)."""
    keep = max(keep, min(protect, scores.numel()))
    if keep >= scores.numel():
        return torch.arange(scores.numel(), device=scores.device)
    if span:
        return top_spans(scores, keep, protect, span)
    scores = scores.clone()
    scores[-protect:] = float("inf")
    return scores.topk(keep).indices.sort().values


def top_spans(scores: torch.Tensor, keep: int, protect: int, span: int) -> torch.Tensor:
    """``keep`` indices: the last ``protect``, then window by window around the best other scores:
    each centre, then its neighbours at distance 1, 2, .. ``span`` (none counted twice)."""
    total = scores.numel()
    kept = set(range(total - protect, total))
    steps = [0] + [sign * d for d in range(1, span + 1) for sign in (1, -1)]
    for centre in scores[:total - protect].argsort(descending=True).tolist():
        if len(kept) >= keep:
            break
        for index in (centre + step for step in steps):
            if 0 <= index < total and len(kept) < keep:
                kept.add(index)
    return torch.tensor(sorted(kept), device=scores.device)


# ------------------------------------------------------------- carrying a subset
class LayerCutter:
    """Forward pre-hooks on the decoder layers: from layer ``l`` of ``stages`` on, only the tokens
    ``choose(l, subset)`` returns (relative indices into the current subset) go on."""

    def __init__(self, model, subset: Subset, stages: set[int], choose):
        self.model, self.subset, self.stages, self.choose = model, subset, stages, choose
        self.first = min(stages) if stages else None
        self._cut: dict[int, object] = {}  # id of a whole-prompt kwarg -> its cut for the current subset

    def __call__(self, index: int, args, kwargs):
        if self.first is None or index < self.first:
            return None
        hidden = args[0] if args else kwargs["hidden_states"]
        if index in self.stages:
            kept = self.choose(index, self.subset)
            hidden = hidden.index_select(1, kept)
            self.subset.positions = self.subset.positions.index_select(0, kept)
            self._cut.clear()
        kwargs = {key: self.cut(value) for key, value in kwargs.items() if key != "hidden_states"}
        if args:
            return (hidden, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": hidden}

    def cut(self, value):
        """A whole-prompt tensor (or tuple of them: RoPE cos/sin) restricted to the current subset."""
        if isinstance(value, tuple):
            return tuple(self.cut(item) for item in value)
        if not isinstance(value, torch.Tensor) or value.dim() < 2 or value.shape[-2 if value.dim() == 4 else 1] != self.subset.total:
            return value
        if id(value) not in self._cut:
            positions = self.subset.positions.to(value.device)
            if value.dim() == 4:  # [batch, 1, q, kv] mask: rows and columns
                cut = value.index_select(2, positions).index_select(3, positions)
            else:  # [batch, n, ...]: position ids, cos, sin
                cut = value.index_select(1, positions)
            self._cut[id(value)] = (value, cut)  # keep value alive: its id stays unique
        return self._cut[id(value)][1]

    @contextmanager
    def installed(self):
        handles = [
            layer.register_forward_pre_hook(lambda module, args, kwargs, i=i: self(i, args, kwargs), with_kwargs=True)
            for i, layer in enumerate(decoder_layers(self.model))
        ]
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()


@contextmanager
def subset_prefill(cache: SelectingCache, subset: Subset):
    """The selecting layers take the tokens they get at ``subset``'s true positions; afterwards every
    layer reports the whole prompt as seen (:func:`finish`)."""
    cache.shared[SUBSET] = subset
    try:
        yield subset
    finally:
        cache.shared.pop(SUBSET, None)
    finish(cache, subset.total)


def finish(cache: SelectingCache, total: int) -> None:
    """transformers' sliding-window layers counted the tokens they got: they saw ``total``."""
    for layer in cache.layers:
        if hasattr(layer, "cumulative_length"):
            layer.cumulative_length = total


def subset_masks(model, positions: torch.Tensor):
    """The attention mask argument for a forward of tokens at ``positions`` (sorted, batch of one):
    None (causal) without sliding layers, else per layer type with the window in true distance."""
    window = sliding_window(model)
    if not window:
        return None
    distance = positions[:, None] - positions[None, :]
    sliding = ((distance >= 0) & (distance < window))[None, None]
    return {"full_attention": None, "sliding_attention": sliding}


def logits_of(out) -> torch.Tensor:
    return out.logits[:, -1].float()
