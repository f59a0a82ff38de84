"""``prompt_lookup``: match the last n-gram (n = 4..1) in the prompt + output so far and draft
what followed it (up to ``branches`` distinct continuations, most recent first)."""

from __future__ import annotations

import numpy as np

from tokensift.speculative.base import Drafter


class PromptLookup(Drafter):
    """Draft what followed the latest earlier occurrence of the context's last n-gram.

    Parameters
    ----------
    max_ngram : int, default 4
        Longest suffix n-gram matched; shorter ones are tried down to 1 when it has no match.
    max_len : int, default 12
        Most tokens drafted per continuation.
    branches : int, default 2
        Most distinct continuations (by first token) drafted per step, most recent first.
    """

    name = "prompt_lookup"

    def __init__(self, max_ngram: int = 4, max_len: int = 12, branches: int = 2):
        self.max_ngram, self.max_len, self.branches = max_ngram, max_len, branches
        self._array = np.zeros(0, dtype=np.int64)

    def begin(self, context):
        self._array = np.asarray(context, dtype=np.int64)

    def extend(self, context, added):
        if len(self._array) + added != len(context):
            self._array = np.asarray(context, dtype=np.int64)
        else:
            self._array = np.concatenate([self._array, np.asarray(context[-added:], dtype=np.int64)])

    def continuations(self, context) -> list[tuple[int, list[int]]]:
        """(n-gram length, continuation) pairs, longest match first."""
        array = self._array if len(self._array) == len(context) else np.asarray(context, dtype=np.int64)
        length = len(array)
        found, seen = [], set()
        for n in range(min(self.max_ngram, length - 1), 0, -1):
            suffix = array[length - n:]
            starts = np.flatnonzero(array[: length - n] == suffix[0])
            for start in starts[::-1]:
                if start + n >= length or not np.array_equal(array[start:start + n], suffix):
                    continue
                cont = array[start + n:start + n + self.max_len].tolist()
                if not cont or cont[0] in seen:
                    continue
                seen.add(cont[0])
                found.append((n, cont))
                if len(found) >= self.branches:
                    return found
            if found:
                return found
        return found

    def propose(self, context, tree, stats):
        for rank, (n, cont) in enumerate(self.continuations(context)):
            keys = [(self.name, n, min(rank, 1), min(d, 8)) for d in range(1, len(cont) + 1)]
            tree.add_path(cont, [stats.rate(k) for k in keys], keys)
