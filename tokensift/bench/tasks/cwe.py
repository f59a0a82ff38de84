"""``cwe``: common words extraction, after RULER (Hsieh et al. 2024).

A numbered list of essay words in which a few words appear far more often than the rest; the
question asks for the most common ones. The list fills the context to the exact length.
"""

from __future__ import annotations

import random

from tokensift.bench.tasks.base import Prompt, assemble
from tokensift.data import encode, essay_words
from tokensift.bench.tasks.registry import Task, register

NUM_COMMON = 5
RARE_FREQUENCY = 3
COMMON_SHARE = 0.3
PAD_TEXT = "\n"
HEADER = (
    "Below is a numbered list of words. In these words, some appear more often than others. "
    "Memorize the ones that appear most often.\n"
)


class WordList:
    """A numbered word list measured in tokens ("1. word\\n" per item)."""

    def __init__(self, tokenizer, words: list[str], is_common: list[bool]):
        self.tokenizer = tokenizer
        self.words = words
        self.is_common = is_common

    def item_ids(self, position: int) -> list[int]:
        """Token ids of the item at ``position`` (numbered from 1)."""
        return encode(self.tokenizer, f"{position + 1}. {self.words[position]}\n")

    def ids(self) -> list[int]:
        """Token ids of the whole list."""
        return [i for position in range(len(self.words)) for i in self.item_ids(position)]

    def drop_last_rare(self) -> None:
        """Remove the last item that is not a common word."""
        position = max(p for p, common in enumerate(self.is_common) if not common)
        del self.words[position], self.is_common[position]

    def append_rare(self, word: str) -> None:
        """Add one rare word at the end."""
        self.words.append(word)
        self.is_common.append(False)


def draw_list(tokenizer, rng: random.Random, n_tokens: int) -> tuple[WordList, list[str], int, list[str]]:
    """A shuffled list sized for about ``n_tokens``, its common words, their count, spare words."""
    vocabulary = essay_words()
    tokens_per_item = _mean_item_tokens(tokenizer, rng.sample(vocabulary, 32))
    items = max(NUM_COMMON * 4, int(n_tokens / tokens_per_item))
    frequency = max(2 * RARE_FREQUENCY, round(COMMON_SHARE * items / NUM_COMMON))
    rare_count = max(1, (items - NUM_COMMON * frequency) // RARE_FREQUENCY)
    chosen = rng.sample(vocabulary, NUM_COMMON + rare_count + 64)
    common, rare, spare = chosen[:NUM_COMMON], chosen[NUM_COMMON:-64], chosen[-64:]
    entries = [(w, True) for w in common for _ in range(frequency)]
    entries += [(w, False) for w in rare for _ in range(RARE_FREQUENCY)]
    rng.shuffle(entries)
    words_list = WordList(tokenizer, [w for w, _ in entries], [c for _, c in entries])
    return words_list, common, frequency, spare


def _mean_item_tokens(tokenizer, words: list[str]) -> float:
    """Average tokens of a list item for these words, numbered in the hundreds."""
    return sum(len(encode(tokenizer, f"{100 + i}. {w}\n")) for i, w in enumerate(words)) / len(words)


def fit_list(word_list: WordList, spare: list[str], n_tokens: int, pad_id: int) -> list[int]:
    """Trim or extend the list with rare words, then pad with newlines to exactly ``n_tokens``."""
    ids = word_list.ids()
    while len(ids) > n_tokens:
        for _ in range(max(1, (len(ids) - n_tokens) // 8)):
            word_list.drop_last_rare()
        ids = word_list.ids()
    for word in spare:
        word_list.append_rare(word)
        extended = ids + word_list.item_ids(len(word_list.words) - 1)
        if len(extended) > n_tokens:
            word_list.drop_last_rare()
            break
        ids = extended
    return ids + [pad_id] * (n_tokens - len(ids))


@register
class CommonWordsExtraction(Task):
    """Name the five words that appear most often in a long list."""

    name = "cwe"
    description = f"{NUM_COMMON} frequent words in a numbered list"

    def make(self, tokenizer, rng, length, index, seed, protocol):
        prompt = Prompt(
            header=HEADER,
            question=f"What are the {NUM_COMMON} most common words in the above list?",
            answer_cue=f"The top {NUM_COMMON} words that appear most often in the list are:",
        )
        (pad_id,) = encode(tokenizer, PAD_TEXT)
        drawn: dict = {}

        def body(n_tokens: int) -> list[int]:
            word_list, common, frequency, spare = draw_list(tokenizer, rng, n_tokens)
            drawn.update(common=common, frequency=frequency)
            return fit_list(word_list, spare, n_tokens, pad_id)

        instance = assemble(
            task=self.name, tokenizer=tokenizer, protocol=protocol, length=length, index=index,
            seed=seed, prompt=prompt, body=body, answers=[], max_new_tokens=30, meta={},
        )
        instance.answers = list(drawn["common"])
        instance.meta = {"frequency": drawn["frequency"], "rare_frequency": RARE_FREQUENCY}
        return instance, []
