"""LazyLLM: progressive, attention-guided pruning of prompt tokens during prefill."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokensift.errors import TokensiftError
from tokensift.prefill import subset as sub
from tokensift.prefill.base import PrefillPolicy, check_fractions, keep_count, register


@register
@dataclass
class LazyLLM(PrefillPolicy):
    """LazyLLM (Fu et al. 2024, "LazyLLM: Dynamic Token Pruning for Efficient Long Context LLM
    Inference", arXiv:2407.14057): at a few layers, the prompt tokens that the last token attends
    to least (attention averaged over heads, top-k percentile) stop being computed; the pruning is
    progressive, each stage keeping fewer tokens. The last token is always kept (only its logits
    are needed). The paper reports 2.34x faster prefill on Llama 2 7B multi-document QA.

    Scores come from the attention of the layer before each stage; when the model has
    sliding-window layers, from the last full-attention layer before the stage (a sliding layer
    only sees its window), or, before any, from the layer before with its window lifted.

    Limit: the paper's Aux Cache (pruned tokens' hidden states, revived when a later step needs
    them) is not implemented. A token pruned at layer ``l`` has no K/V at layers ``>= l`` for the
    whole generation, exactly like a token evicted there; the cache behaves as a per-layer evicting
    cache, so any KV policy and speculation act on what was kept. Batch of one.

    Parameters
    ----------
    layers : tuple of float, default (0.25, 0.5, 0.75)
        Where the stages start: fractions of the depth in (0, 1) or layer indices >= 1
        (increasing). The paper prunes progressively at a few layers spread over the depth and
        tunes the layers and percentiles per model.
    keep : tuple of float, default (0.5, 0.25, 0.125)
        Fraction of the prompt still computed from each stage on, one per stage, in (0, 1],
        non-increasing (the default halves the tokens at each stage).
    rows : int, default 1
        Last prompt tokens whose attention scores the tokens (the paper: the last one).
    recent : int, default 0
        Newest prompt tokens never pruned (besides the last). On models with sliding-window
        layers (Gemma 3) the last ``window`` tokens are always kept: those layers read them.
    """

    name = "lazyllm"
    paper = "LazyLLM (Fu et al. 2024, arXiv:2407.14057)"

    layers: tuple[float, ...] = (0.25, 0.5, 0.75)
    keep: tuple[float, ...] = (0.5, 0.25, 0.125)
    rows: int = 1
    recent: int = 0

    def check(self) -> None:
        self.layers, self.keep = tuple(self.layers), tuple(self.keep)
        check_fractions(self.name, "keep", self.keep)
        if not self.layers or len(self.layers) != len(self.keep):
            raise TokensiftError(f"lazyllm: give one keep fraction per pruning layer (got {len(self.layers)} layers, "
                                 f"{len(self.keep)} fractions)")
        if any(b > a for a, b in zip(self.keep, self.keep[1:])):
            raise TokensiftError(f"lazyllm: keep fractions must not increase from stage to stage (got {self.keep})")
        if self.rows < 1 or self.recent < 0:
            raise TokensiftError(f"lazyllm: rows must be >= 1 and recent >= 0 (got {self.rows}, {self.recent})")

    def schedule(self, model) -> dict[int, float]:
        """Pruning layer index -> kept fraction of the prompt, checked against the model's depth."""
        depth = len(sub.decoder_layers(model))
        indices = [sub.layer_index(value, depth, self.name) for value in self.layers]
        if any(b <= a for a, b in zip(indices, indices[1:])):
            raise TokensiftError(f"lazyllm: pruning layers must increase (got layers {indices} of {depth})")
        return dict(zip(indices, self.keep))

    def run(self, model, cache, ids: torch.Tensor) -> torch.Tensor:
        sub.check_cache(cache)
        total = ids.shape[1]
        stages = self.schedule(model)
        sources = {layer: score_layer(model, layer) for layer in stages}
        protect = max(self.recent + 1, sub.sliding_window(model))
        subset = sub.Subset(torch.arange(total, device=ids.device), total)
        watch = sub.ScoreWatch(set(sources.values()), subset, self.rows)

        def choose(layer: int, current: sub.Subset) -> torch.Tensor:
            scores = watch.scores[sources[layer]].index_select(0, current.positions)
            return sub.top_tokens(scores, keep_count(stages[layer], total), protect)

        cutter = sub.LayerCutter(model, subset, set(stages), choose)
        with sub.subset_prefill(cache, subset), sub.watching(watch), cutter.installed():
            out = model(input_ids=ids, attention_mask=torch.ones_like(ids), past_key_values=cache,
                        use_cache=True, logits_to_keep=1)
        return sub.logits_of(out)


def score_layer(model, layer: int) -> int:
    """The layer whose attention scores the tokens pruned at ``layer``: the one before it, or on
    models with sliding-window layers the last full-attention layer before it (if any)."""
    kinds = sub.layer_types(model)
    full = [i for i in range(layer) if kinds[i] == "full_attention"]
    if "sliding_attention" in kinds and full:
        return full[-1]
    return layer - 1
