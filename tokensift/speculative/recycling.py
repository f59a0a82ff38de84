"""``recycling`` (Token Recycling): an adjacency matrix ``[vocab, k]`` holding, for each token,
the model's top-k next tokens the last time it produced logits after that token. A draft
tree is read off the matrix breadth-first along a static tree template; rows are refreshed
from every row of logits the verifier computes. The matrix lives across prompts and can be
saved and loaded (``k * vocab`` int32: 1.5 MB for SmolLM2's 49152 tokens at k = 8)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from tokensift.errors import TokensiftError
from tokensift.speculative.base import Drafter

# children per node by (depth, own sibling rank): depth-1 nodes are the root's children.
DEFAULT_WIDTHS = (8, 4, 2, 2, 1, 1, 1, 1)  # 69 nodes, depth 8


def template(widths=DEFAULT_WIDTHS) -> list[tuple[int, int]]:
    """Static tree template: (parent template index, sibling rank); index 0 is the root."""
    nodes = [(-1, 0)]
    frontier = [(0, 0, 0)]  # (index, depth, rank)
    while frontier:
        nxt = []
        for index, depth, rank in frontier:
            if depth >= len(widths):
                continue
            count = max(widths[depth] >> rank, 1 if rank == 0 else 0) if depth > 0 else widths[0]
            for child_rank in range(count):
                nodes.append((index, child_rank))
                nxt.append((len(nodes) - 1, depth + 1, child_rank))
        frontier = nxt
    return nodes


class Recycling(Drafter):
    """Draft along a static tree template from each token's last top-k successors.

    Parameters
    ----------
    vocab_size : int
        The model's vocabulary size (rows of the adjacency matrix).
    k : int, default 8
        Successors stored per token (the top-k of the last logits seen after it).
    widths : tuple of int, default (8, 4, 2, 2, 1, 1, 1, 1)
        Children per template node by depth (root first); below the root, a node of sibling
        rank ``r`` gets ``widths[depth] >> r`` children (at least one for rank 0).
    """

    name = "recycling"

    def __init__(self, vocab_size: int, k: int = 8, widths=DEFAULT_WIDTHS):
        self.vocab_size, self.k, self.widths = vocab_size, k, tuple(widths)
        self.adjacency = np.full((vocab_size, k), -1, dtype=np.int32)
        self.template = template(self.widths)

    def propose(self, context, tree, stats):
        adjacency = self.adjacency
        tokens = [context[-1]]
        where = [0]  # candidate-tree index of each template node
        for index, (parent, rank) in enumerate(self.template[1:], start=1):
            parent_token = tokens[parent]
            if parent_token < 0 or where[parent] < 0:
                tokens.append(-1)
                where.append(-1)
                continue
            token = int(adjacency[parent_token, rank])
            tokens.append(token)
            if token < 0:
                where.append(-1)
                continue
            depth = tree.nodes[where[parent]].depth + 1
            key = (self.name, min(depth, 8), min(rank, 4))
            where.append(tree.add(where[parent], token, stats.rate(key), key))

    def observe(self, token, logits):
        top = torch.topk(logits, self.k).indices
        self.adjacency[token] = top.cpu().numpy().astype(np.int32)

    def observe_rows(self, tokens, logits):
        top = torch.topk(logits, self.k, dim=-1).indices.cpu().numpy().astype(np.int32)
        self.adjacency[np.asarray(tokens, dtype=np.int64)] = top  # a repeated token keeps its last row

    def save(self, path: Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as handle:  # a file handle: numpy adds no ".npz" to the name
            np.savez_compressed(handle, adjacency=self.adjacency, widths=np.asarray(self.widths))

    @classmethod
    def load(cls, path: Path) -> Recycling:
        path = Path(path)
        if not path.exists():
            raise TokensiftError(f"recycling state not found: {path}")
        with np.load(path) as data:
            adjacency = data["adjacency"]
            drafter = cls(adjacency.shape[0], adjacency.shape[1], tuple(int(w) for w in data["widths"]))
        drafter.adjacency = adjacency.astype(np.int32)
        return drafter
