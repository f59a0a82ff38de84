"""Scoring generated text against gold answers (RULER's ``string_match_all``).

The score is the fraction of gold answers found in the generation, each matched as a whole
token (a value ``58213`` does not match inside ``158213``), case-insensitively. Text after the
model starts a new ``Question:`` is ignored.
"""

from __future__ import annotations

import re

NEW_QUESTION = re.compile(r"\n\s*Question\s*:")


def answer_part(generated: str) -> str:
    """The generation up to where the model starts asking itself a new question."""
    return NEW_QUESTION.split(generated, maxsplit=1)[0]


def contains_answer(answer: str, text: str) -> bool:
    """Whether ``answer`` occurs in ``text`` as a whole word or number."""
    pattern = rf"(?<![0-9A-Za-z]){re.escape(answer)}(?![0-9A-Za-z])"
    return re.search(pattern, text, flags=re.IGNORECASE) is not None


def answer_recall(answers: list[str], generated: str) -> float:
    """Fraction of ``answers`` present in ``generated`` (1.0 when there are none to find)."""
    if not answers:
        return 1.0
    text = answer_part(generated)
    return sum(contains_answer(answer, text) for answer in answers) / len(answers)


def answer_settled(answers: list[str], generated: str) -> bool:
    """Whether more text can no longer change :func:`answer_recall`.

    True once the model starts a new question (the rest is ignored), or once every answer is
    found *and closed* by a following separator (more digits could not extend it). The
    benchmark stops decoding there: the score is the same as after all ``max_new_tokens``.
    """
    if not answers:
        return False
    if NEW_QUESTION.search(generated):
        return True
    closed = r"(?<![0-9A-Za-z]){}(?=[^0-9A-Za-z])"
    return all(re.search(closed.format(re.escape(a)), generated, flags=re.IGNORECASE) for a in answers)
