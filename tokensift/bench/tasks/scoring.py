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
