"""``niah_multikey``: the asked needle hides among distractor needles with other keys.

RULER's NIAH multi-key (Hsieh et al. 2024): four needles of the same form, one asked.
"""

from __future__ import annotations

from tokensift.bench.tasks.base import Prompt
from tokensift.bench.tasks.needles import HEADER, distinct_keys, distinct_values, needle_instance, needle_text
from tokensift.bench.tasks.registry import Task, register

NUM_KEYS = 4


@register
class NiahMultiKey(Task):
    """Retrieve the value of one key while three other keys have values too."""

    name = "niah_multikey"
    description = "one needle among 3 distractor needles"

    def make(self, tokenizer, rng, length, index, seed, protocol):
        keys = distinct_keys(rng, NUM_KEYS)
        values = distinct_values(rng, NUM_KEYS)
        needles = [(rng.random(), needle_text(k, v)) for k, v in zip(keys, values)]
        key, value = keys[0], values[0]
        prompt = Prompt(
            header=HEADER,
            question=f"What is the special magic number for {key} mentioned in the provided text?",
            answer_cue=f"The special magic number for {key} mentioned in the provided text is",
        )
        return needle_instance(
            task=self.name, tokenizer=tokenizer, rng=rng, length=length, index=index, seed=seed,
            protocol=protocol, needles=needles, prompt=prompt, answers=[value],
            max_new_tokens=12,
            meta={"key": key, "distractors": dict(zip(keys[1:], values[1:])), "depth": needles[0][0]},
        )
