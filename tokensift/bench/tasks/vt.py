"""``vt``: variable tracking, after RULER (Hsieh et al. 2024).

A chain ``VAR A = 12345.``, ``VAR B = VAR A.``, ... is hidden, in order, in essay text; the
question asks which variables are assigned the value, so every hop must be followed. The
answer cue is RULER's, ending in "VAR" so that this small model answers with variable names
(without it, SmolLM2-135M answered "1. 2. 3. ..." on every instance).
"""

from __future__ import annotations

import random
import string

from tokensift.bench.tasks.base import Prompt
from tokensift.bench.tasks.needles import distinct_values, needle_instance
from tokensift.bench.tasks.registry import Task, register

NUM_HOPS = 4
NAME_LETTERS = 5
HEADER = (
    "Memorize and track the chain(s) of variable assignment hidden in the following text.\n"
)


def variable_names(rng: random.Random, count: int) -> list[str]:
    """``count`` different names of five capital letters."""
    names: list[str] = []
    while len(names) < count:
        name = "".join(rng.choice(string.ascii_uppercase) for _ in range(NAME_LETTERS))
        if name not in names:
            names.append(name)
    return names


def chain_statements(names: list[str], value: str) -> list[str]:
    """``VAR n0 = value.`` then ``VAR n_i = VAR n_(i-1).`` for the rest."""
    first = [f"VAR {names[0]} = {value}."]
    return first + [f"VAR {new} = VAR {old}." for old, new in zip(names, names[1:])]


@register
class VariableTracking(Task):
    """Follow a chain of assignments and name every variable holding the value."""

    name = "vt"
    description = "chain of 5 variables (4 hops) in essay text"

    def make(self, tokenizer, rng, length, index, seed, protocol):
        names = variable_names(rng, NUM_HOPS + 1)
        (value,) = distinct_values(rng, 1)
        statements = chain_statements(names, value)
        depths = sorted(rng.random() for _ in statements)
        prompt = Prompt(
            header=HEADER,
            question=f"Find all variables that are assigned the value {value} in the text above.",
            answer_cue=(
                "According to the chain(s) of variable assignment in the text above, "
                f"{len(names)} variables are assigned the value {value}, they are: VAR"
            ),
        )
        instance, _ = needle_instance(
            task=self.name, tokenizer=tokenizer, rng=rng, length=length, index=index, seed=seed,
            protocol=protocol, needles=list(zip(depths, statements)), prompt=prompt,
            answers=names, max_new_tokens=30, meta={"value": value, "depths": depths},
        )
        return instance, statements
