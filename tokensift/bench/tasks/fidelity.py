"""``fidelity``: a long essay prompt whose 64-token greedy continuation is compared with the
full-cache one.

The prompt is ``length - CONTINUATION_TOKENS`` tokens of essays starting at an essay's first
token; its last ``SUFFIX_TOKENS`` tokens form the suffix (appended after the context is
compressed), so decoding starts from a short uncompressed tail as in the other tasks. There is
no gold text: the runner scores agreement with the full-cache continuation.
"""

from __future__ import annotations

from tokensift.data import essay_stream
from tokensift.bench.tasks.instance import QUERY_AGNOSTIC, TaskInstance
from tokensift.bench.tasks.registry import Task, register
from tokensift.errors import TokensiftError

CONTINUATION_TOKENS = 64
SUFFIX_TOKENS = 8


@register
class Fidelity(Task):
    """Greedy continuation of a long essay prompt, compared with the full cache's."""

    name = "fidelity"
    runs = "fidelity"
    description = f"essay prompt, {CONTINUATION_TOKENS}-token greedy continuation"

    def make(self, tokenizer, rng, length, index, seed, protocol):
        stream = essay_stream(tokenizer)
        prompt_len = length - CONTINUATION_TOKENS
        starts = [s for s in stream.essay_starts if s + length <= len(stream.ids)]
        start = rng.choice(starts)
        ids = list(stream.ids[start : start + prompt_len])
        split = prompt_len - SUFFIX_TOKENS
        instance = TaskInstance(
            task=self.name, protocol=QUERY_AGNOSTIC, length=length, index=index, seed=seed,
            context_ids=ids[:split], suffix_ids=ids[split:], answers=[],
            max_new_tokens=CONTINUATION_TOKENS, meta={"stream_start": start},
        )
        return instance, []

    def score(self, instance, generated):
        raise TokensiftError("fidelity is scored against the full-cache continuation, not gold text")
