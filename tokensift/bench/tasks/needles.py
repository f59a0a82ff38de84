"""Needle-in-a-haystack helpers shared by the ``niah*`` tasks (after RULER, Hsieh et al. 2024).

A needle is one sentence, "The special magic number for <key> is <value>.", where the key is
a word from the essays and the value a 5-digit number; needles sit at sentence boundaries of
real essay text.
"""

from __future__ import annotations

import random

from tokensift.bench.tasks.base import Prompt, assemble, haystack_with_inserts
from tokensift.data import encode, essay_stream, essay_words
from tokensift.bench.tasks.instance import TaskInstance

HEADER = (
    "Some special magic numbers are hidden within the following text. "
    "Make sure to memorize them. I will quiz you about the numbers afterwards.\n"
)
DIGITS_PER_VALUE = 5


def needle_text(key: str, value: str, one_of: bool = False) -> str:
    """The needle sentence; ``one_of`` for a key that has several values."""
    if one_of:
        return f"One of the special magic numbers for {key} is {value}."
    return f"The special magic number for {key} is {value}."


def distinct_keys(rng: random.Random, count: int) -> list[str]:
    """``count`` different essay words to name needles."""
    return rng.sample(essay_words(), count)


def distinct_values(rng: random.Random, count: int) -> list[str]:
    """``count`` different 5-digit values."""
    values: list[str] = []
    while len(values) < count:
        value = str(rng.randint(10 ** (DIGITS_PER_VALUE - 1), 10**DIGITS_PER_VALUE - 1))
        if value not in values:
            values.append(value)
    return values


def join_words(words: list[str]) -> str:
    """"a", "a and b", "a, b and c"."""
    if len(words) == 1:
        return words[0]
    return ", ".join(words[:-1]) + " and " + words[-1]


def needle_instance(
    *,
    task: str,
    tokenizer,
    rng: random.Random,
    length: int,
    index: int,
    seed: int,
    protocol: str,
    needles: list[tuple[float, str]],
    prompt: Prompt,
    answers: list[str],
    max_new_tokens: int,
    meta: dict,
) -> tuple[TaskInstance, list[str]]:
    """An instance whose body is essay text with ``(depth, sentence)`` needles inserted.

    Returns the instance and the texts (needles and answers) that must occur exactly once.
    """
    inserts = [(depth, encode(tokenizer, " " + text)) for depth, text in needles]
    stream = essay_stream(tokenizer)
    instance = assemble(
        task=task,
        tokenizer=tokenizer,
        protocol=protocol,
        length=length,
        index=index,
        seed=seed,
        prompt=prompt,
        body=lambda n: haystack_with_inserts(stream, rng, n, inserts),
        answers=answers,
        max_new_tokens=max_new_tokens,
        meta=meta,
    )
    return instance, [text for _, text in needles] + answers
