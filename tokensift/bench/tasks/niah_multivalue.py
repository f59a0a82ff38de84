"""``niah_multivalue``: one key holds several values; all of them must be returned.

RULER's NIAH multi-value (Hsieh et al. 2024): four values for the asked key; partial credit
is the fraction returned.
"""

from __future__ import annotations

from tokensift.bench.tasks.base import Prompt
from tokensift.bench.tasks.needles import HEADER, distinct_keys, distinct_values, needle_instance, needle_text
from tokensift.bench.tasks.registry import Task, register

NUM_VALUES = 4


@register
class NiahMultiValue(Task):
    """Retrieve every value stored under one key."""

    name = "niah_multivalue"
    description = "4 values under one key, all asked"

    def make(self, tokenizer, rng, length, index, seed, protocol):
        (key,) = distinct_keys(rng, 1)
        values = distinct_values(rng, NUM_VALUES)
        needles = [(rng.random(), needle_text(key, v, one_of=True)) for v in values]
        prompt = Prompt(
            header=HEADER,
            question=f"What are all the special magic numbers for {key} mentioned in the provided text?",
            answer_cue=f"The special magic numbers for {key} mentioned in the provided text are",
        )
        return needle_instance(
            task=self.name, tokenizer=tokenizer, rng=rng, length=length, index=index, seed=seed,
            protocol=protocol, needles=needles, prompt=prompt, answers=values,
            max_new_tokens=36, meta={"key": key, "depths": [d for d, _ in needles]},
        )
