"""``ppl``: a stream of concatenated essays whose last tokens are scored by perplexity.

The instance is ``length`` tokens of essays starting at an essay's first token: the first
``length - SCORED_TOKENS`` are the context (prefilled, compressed), the last ``SCORED_TOKENS``
the suffix, fed one at a time by the runner under its decode-time budget to measure the
negative log-likelihood of each. Nothing is generated, so the stream may use all ``length``.
"""

from __future__ import annotations

from tokensift.data import essay_stream
from tokensift.bench.tasks.instance import QUERY_AGNOSTIC, TaskInstance
from tokensift.bench.tasks.registry import Task, register
from tokensift.errors import TokensiftError

SCORED_TOKENS = 512


@register
class Perplexity(Task):
    """Perplexity of the last 512 tokens of an essay stream."""

    name = "ppl"
    runs = "ppl"
    description = f"essay stream, last {SCORED_TOKENS} tokens scored"

    def make(self, tokenizer, rng, length, index, seed, protocol):
        if length <= SCORED_TOKENS:
            raise TokensiftError(f"ppl length must exceed {SCORED_TOKENS} tokens, got {length}")
        stream = essay_stream(tokenizer)
        starts = [s for s in stream.essay_starts if s + length <= len(stream.ids)]
        start = rng.choice(starts)
        ids = list(stream.ids[start : start + length])
        split = length - SCORED_TOKENS
        instance = TaskInstance(
            task=self.name, protocol=QUERY_AGNOSTIC, length=length, index=index, seed=seed,
            context_ids=ids[:split], suffix_ids=ids[split:], answers=[], max_new_tokens=0,
            meta={"scored_tokens": SCORED_TOKENS, "stream_start": start},
        )
        return instance, []

    def score(self, instance, generated):
        raise TokensiftError("ppl is scored by perplexity of its suffix tokens, not by generated text")
