"""``niah_multiquery``: several keys, each with its own value, asked at once.

RULER's NIAH multi-query (Hsieh et al. 2024): four needles, all four keys in one question.
"""

from __future__ import annotations

from tokensift.bench.tasks.base import Prompt
from tokensift.bench.tasks.needles import (
    HEADER, distinct_keys, distinct_values, join_words, needle_instance, needle_text,
)
from tokensift.bench.tasks.registry import Task, register

NUM_QUERIES = 4


@register
class NiahMultiQuery(Task):
    """Retrieve the values of four keys asked together."""

    name = "niah_multiquery"
    description = "4 needles, all 4 keys asked at once"

    def make(self, tokenizer, rng, length, index, seed, protocol):
        keys = distinct_keys(rng, NUM_QUERIES)
        values = distinct_values(rng, NUM_QUERIES)
        needles = [(rng.random(), needle_text(k, v)) for k, v in zip(keys, values)]
        asked = join_words(keys)
        prompt = Prompt(
            header=HEADER,
            question=f"What are the special magic numbers for {asked} mentioned in the provided text?",
            answer_cue=f"The special magic numbers for {asked} mentioned in the provided text are",
        )
        return needle_instance(
            task=self.name, tokenizer=tokenizer, rng=rng, length=length, index=index, seed=seed,
            protocol=protocol, needles=needles, prompt=prompt, answers=values,
            max_new_tokens=40, meta={"keys": keys, "depths": [d for d, _ in needles]},
        )
