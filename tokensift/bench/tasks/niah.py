"""``niah``: one needle at a depth that cycles 0%, 25%, 50%, 75%, 100% over the instances.

After the single-needle NIAH of RULER (Hsieh et al. 2024, "RULER: What's the Real Context Size
of Your Long-Context Language Models?") with a word key and a 5-digit value.
"""

from __future__ import annotations

from tokensift.bench.tasks.base import Prompt
from tokensift.bench.tasks.needles import HEADER, distinct_keys, distinct_values, needle_instance, needle_text
from tokensift.bench.tasks.registry import Task, register

DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)


@register
class Niah(Task):
    """Retrieve the one value stored under one key."""

    name = "niah"
    description = "single needle at depths 0..100%"

    def make(self, tokenizer, rng, length, index, seed, protocol):
        (key,) = distinct_keys(rng, 1)
        (value,) = distinct_values(rng, 1)
        depth = DEPTHS[index % len(DEPTHS)]
        prompt = Prompt(
            header=HEADER,
            question=f"What is the special magic number for {key} mentioned in the provided text?",
            answer_cue=f"The special magic number for {key} mentioned in the provided text is",
        )
        return needle_instance(
            task=self.name, tokenizer=tokenizer, rng=rng, length=length, index=index, seed=seed,
            protocol=protocol, needles=[(depth, needle_text(key, value))], prompt=prompt,
            answers=[value], max_new_tokens=12, meta={"key": key, "depth": depth},
        )
