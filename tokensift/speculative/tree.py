"""Draft trees: candidate tries from drafters, selection of the nodes worth verifying, and the
4D tree attention mask + per-node positions for one verification forward.

Node 0 is the root: the last accepted token (not yet in the cache). Every other node is a
drafted token; it sees the cached prefix, its ancestors and itself, at position
``prefix length + depth``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Node:
    token: int
    parent: int
    depth: int
    rate: float = 0.0  # estimated P(accepted | parent accepted), combined over sources
    prob: float = 1.0  # estimated P(accepted) = product of rates along the path
    sources: list = field(default_factory=list)  # stats keys of the drafters that proposed it
    children: dict = field(default_factory=dict)  # token -> node index


class CandidateTree:
    """A trie of drafted continuations of the root; several drafters may add to it."""

    def __init__(self, root_token: int):
        self.nodes = [Node(root_token, -1, 0, 1.0, 1.0)]

    def add(self, parent: int, token: int, rate: float, key) -> int:
        """Add (or merge into) the child ``token`` of ``parent``; returns its index."""
        node = self.nodes[parent]
        index = node.children.get(token)
        if index is None:
            index = len(self.nodes)
            self.nodes.append(Node(token, parent, node.depth + 1, rate, node.prob * rate, [key]))
            node.children[token] = index
            return index
        child = self.nodes[index]
        if key not in child.sources:
            child.sources.append(key)
            child.rate = 1.0 - (1.0 - child.rate) * (1.0 - rate)
        return index

    def add_path(self, tokens, rates, keys, parent: int = 0) -> None:
        for token, rate, key in zip(tokens, rates, keys):
            parent = self.add(parent, int(token), rate, key)

    def finalize(self) -> None:
        """Recompute path probabilities (parents always precede children)."""
        for node in self.nodes[1:]:
            node.prob = self.nodes[node.parent].prob * node.rate

    def ranked(self) -> list[int]:
        """Draft node indices, most likely first (a parent always before its children)."""
        self.finalize()
        order = sorted(range(1, len(self.nodes)), key=lambda i: (-self.nodes[i].prob, self.nodes[i].depth, i))
        return order

    def subtree(self, chosen: list[int]) -> DraftTree:
        """The verification tree made of the root and ``chosen`` (closed under parents)."""
        keep = sorted(set(chosen), key=lambda i: (self.nodes[i].depth, i))
        index = {0: 0}
        tree = DraftTree([self.nodes[0].token], [-1], [0], [[]])
        tree.probs = [1.0]
        for old in keep:
            node = self.nodes[old]
            if node.parent not in index:
                continue
            index[old] = len(tree.tokens)
            tree.tokens.append(node.token)
            tree.parents.append(index[node.parent])
            tree.depths.append(node.depth)
            tree.sources.append(list(node.sources))
            tree.probs.append(node.prob)
        return tree


class DraftTree:
    """What one verification forward feeds: tokens, parents, depths (node 0 = root)."""

    def __init__(self, tokens, parents, depths, sources):
        self.tokens, self.parents, self.depths, self.sources = tokens, parents, depths, sources
        self.probs = None  # estimated P(accepted) per node, when the drafts came with one
        self._children = None

    def __len__(self) -> int:
        return len(self.tokens)

    @classmethod
    def chain(cls, root: int, tokens) -> DraftTree:
        count = len(tokens)
        return cls([root, *tokens], list(range(-1, count)), list(range(count + 1)), [[] for _ in range(count + 1)])

    def children(self, node: int) -> dict[int, int]:
        if self._children is None:
            self._children = [{} for _ in self.tokens]
            for index, parent in enumerate(self.parents):
                if parent >= 0:
                    self._children[parent].setdefault(self.tokens[index], index)
        return self._children[node]

    def likely_chain(self, node: int, limit: int) -> list[int]:
        """``node`` and up to ``limit - 1`` descendants, each the likeliest child of the one
        before (the first child without probabilities): the path the walk most likely takes."""
        chain = [node]
        while len(chain) < limit and self.children(chain[-1]):
            children = list(self.children(chain[-1]).values())
            chain.append(children[0] if self.probs is None else max(children, key=lambda i: (self.probs[i], -i)))
        return chain

    def ancestors(self) -> torch.Tensor:
        """``[q, q]`` bool: row i sees column j when j is i or an ancestor of i."""
        size = len(self.tokens)
        visible = torch.eye(size, dtype=torch.bool, device="cpu")  # built row by row: on the host
        for index in range(1, size):
            visible[index] |= visible[self.parents[index]]
        return visible

    def attention_mask(self, past: int, device=None) -> torch.Tensor:
        """``[1, 1, q, past + q]`` bool (on ``device``): the whole cached past plus the tree part."""
        size = len(self.tokens)
        mask = torch.ones(1, 1, size, past + size, dtype=torch.bool, device=device)
        mask[0, 0, :, past:] = self.ancestors().to(device)
        return mask

    def position_ids(self, start: int, device=None) -> torch.Tensor:
        return torch.tensor([[start + depth for depth in self.depths]], dtype=torch.long, device=device)
