"""Shared machinery for task generators: length rule, prompt split per protocol, haystacks.

Length rule: an instance built for length ``L`` has exactly ``L - ANSWER_ROOM`` context tokens,
and its suffix plus ``max_new_tokens`` fit in ``ANSWER_ROOM``, so the whole sequence stays within
``L`` tokens (at 8k: 8064 + at most 128 = 8192, the embedded model's limit).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable

from tokensift.data import EssayStream, encode
from tokensift.bench.tasks.instance import QUERY_AGNOSTIC, TaskInstance, check_protocol
from tokensift.errors import TokensiftError

ANSWER_ROOM = 128
MIN_LENGTH = 512
MAX_ATTEMPTS = 20


def context_length(length: int) -> int:
    """Context tokens for a target length ``length`` (see the module docstring)."""
    if not isinstance(length, int) or length < MIN_LENGTH:
        raise TokensiftError(f"task length must be an integer >= {MIN_LENGTH}, got {length!r}")
    return length - ANSWER_ROOM


def instance_rng(task: str, seed: int, length: int, index: int, attempt: int = 0) -> random.Random:
    """A generator that depends only on what names the instance (never on the protocol)."""
    return random.Random(f"{task}:{seed}:{length}:{index}:{attempt}")


def magic_number(rng: random.Random) -> str:
    """A 5-digit value (the passkey size this model retrieves well, see DESIGN)."""
    return str(rng.randint(10000, 99999))


@dataclass(frozen=True)
class Prompt:
    """The words around the body: a header before it, a question and an answer cue after it."""

    header: str
    question: str
    answer_cue: str

    def question_text(self) -> str:
        """The question as it follows the body."""
        return f"\n\nQuestion: {self.question}"

    def cue_text(self) -> str:
        """The answer cue the model continues from."""
        return f" Answer: {self.answer_cue}"


def split_prompt(tokenizer, prompt: Prompt, protocol: str) -> tuple[list[int], list[int]]:
    """Token ids of (question tail of the context, suffix) for a protocol.

    Query-agnostic: the context holds no question; the suffix is question + answer cue.
    Query-aware: the question ends the context; the suffix is only the answer cue.
    """
    if check_protocol(protocol) == QUERY_AGNOSTIC:
        return [], encode(tokenizer, prompt.question_text() + prompt.cue_text())
    return encode(tokenizer, prompt.question_text()), encode(tokenizer, prompt.cue_text())


def haystack_with_inserts(
    stream: EssayStream, rng: random.Random, n_tokens: int, inserts: list[tuple[float, list[int]]]
) -> list[int]:
    """``n_tokens`` ids of essay text with each ``(depth, ids)`` put at a sentence boundary.

    ``depth`` 0.0 is the start of the haystack and 1.0 its end; the essay window starts at a
    random sentence boundary.
    """
    inserted = sum(len(ids) for _, ids in inserts)
    hay_len = n_tokens - inserted
    if hay_len < 0:
        raise TokensiftError(f"length too short for the task: needs more than {inserted} tokens")
    start = _random_start(stream, rng, hay_len)
    hay = list(stream.ids[start : start + hay_len])
    relative = [b - start for b in stream.boundaries_between(start, start + hay_len)]
    spots = sorted({0, hay_len, *relative})
    placed = sorted(
        ((_nearest(spots, depth * hay_len), order, ids) for order, (depth, ids) in enumerate(inserts)),
    )
    out: list[int] = []
    cursor = 0
    for position, _, ids in placed:
        out.extend(hay[cursor:position])
        out.extend(ids)
        cursor = position
    out.extend(hay[cursor:])
    return out


def _random_start(stream: EssayStream, rng: random.Random, hay_len: int) -> int:
    """A random sentence boundary that leaves ``hay_len`` tokens after it."""
    candidates = stream.boundaries_between(0, len(stream.ids) - hay_len)
    if not candidates:
        raise TokensiftError(f"length {hay_len} is longer than the essay corpus")
    return rng.choice(candidates)


def _nearest(spots: list[int], target: float) -> int:
    """The spot closest to ``target`` (ties go to the earlier one)."""
    return min(spots, key=lambda spot: (abs(spot - target), spot))


def assemble(
    *,
    task: str,
    tokenizer,
    protocol: str,
    length: int,
    index: int,
    seed: int,
    prompt: Prompt,
    body: Callable[[int], list[int]],
    answers: list[str],
    max_new_tokens: int,
    meta: dict,
) -> TaskInstance:
    """Build an instance: header + body(n) [+ question] as context, the rest as suffix.

    ``body(n)`` must return exactly ``n`` token ids.
    """
    header = encode(tokenizer, prompt.header)
    question, suffix = split_prompt(tokenizer, prompt, protocol)
    n_body = context_length(length) - len(header) - len(question)
    body_ids = body(n_body)
    if len(body_ids) != n_body:
        raise AssertionError(f"{task}: body gave {len(body_ids)} tokens, wanted {n_body}")
    if len(suffix) + max_new_tokens > ANSWER_ROOM:
        raise AssertionError(f"{task}: suffix and answer exceed {ANSWER_ROOM} tokens")
    return TaskInstance(
        task=task,
        protocol=protocol,
        length=length,
        index=index,
        seed=seed,
        context_ids=header + body_ids + question,
        suffix_ids=suffix,
        answers=answers,
        max_new_tokens=max_new_tokens,
        meta=meta,
    )

