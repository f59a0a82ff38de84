"""``lookahead``: a trie of n-grams from prompts and past outputs (kept across prompts), keyed by
the last 2 (or 1) tokens; drafts several branches per step, most frequent first (the
multi-branch retrieval of the Ant Group "Lookahead" framework)."""

from __future__ import annotations

from tokensift.speculative.base import Drafter


class Lookahead(Drafter):
    """Draft the most frequent branches of an n-gram trie keyed by the last 2 (or 1) tokens.

    Parameters
    ----------
    depth : int, default 8
        Tokens stored after each key (the deepest a drafted branch goes).
    branch_nodes : int, default 24
        Most nodes drafted per step (3 branches at the first level, 2 below).
    max_keys : int, default 200000
        Trie keys held; past this the whole trie is cleared before new windows are inserted.
    """

    name = "lookahead"

    def __init__(self, depth: int = 8, branch_nodes: int = 24, max_keys: int = 200_000):
        self.depth, self.branch_nodes, self.max_keys = depth, branch_nodes, max_keys
        self.tries: dict = {}  # key tuple -> trie {token: [count, children]}
        self._indexed = 0  # positions of the current context already inserted

    def begin(self, context):
        self._indexed = 0
        self._insert(context, final=False)

    def extend(self, context, added):
        self._insert(context, final=False)

    def learn(self, tokens) -> None:
        """Insert every window of ``tokens`` (a finished sequence: a warm start)."""
        indexed, self._indexed = self._indexed, 0
        self._insert(list(tokens), final=True)
        self._indexed = indexed

    def _insert(self, context, final: bool) -> None:
        """Insert the windows starting at each not-yet-indexed position once complete."""
        last = len(context) - (0 if final else self.depth)
        if len(self.tries) > self.max_keys:
            self.tries.clear()
        for start in range(max(self._indexed, 1), last):
            window = context[start:start + self.depth]
            for key_len in (1, 2):
                if start < key_len:
                    continue
                node = self.tries.setdefault(tuple(context[start - key_len:start]), {})
                for token in window:
                    entry = node.get(token)
                    if entry is None:
                        entry = node[token] = [0, {}]
                    entry[0] += 1
                    node = entry[1]
        self._indexed = max(self._indexed, last)

    def propose(self, context, tree, stats):
        for key_len in (2, 1):
            trie = self.tries.get(tuple(context[-key_len:]))
            if trie:
                break
        else:
            return
        budget = [self.branch_nodes]

        def walk(node, parent, depth):
            ranked = sorted(node.items(), key=lambda item: -item[1][0])[:3 if depth == 1 else 2]
            for rank, (token, (count, children)) in enumerate(ranked):
                if budget[0] <= 0:
                    return
                budget[0] -= 1
                key = (self.name, key_len, min(depth, 8), min(rank, 2), count > 1)
                index = tree.add(parent, token, stats.rate(key), key)
                if children:
                    walk(children, index, depth + 1)

        walk(trie, 0, 1)

    def end(self, context):
        self._insert(context, final=True)
