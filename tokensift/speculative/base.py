"""The drafter interface: propose continuations of the root into a candidate tree."""

from __future__ import annotations

import torch

from tokensift.speculative.adaptive import AcceptanceStats
from tokensift.speculative.tree import CandidateTree


class Drafter:
    """A draft-free drafter. ``propose`` adds nodes to ``tree`` (rates from ``stats``);
    ``observe`` sees every row of logits the verifier computed (token of the node, logits of
    what follows it); ``extend`` sees the tokens accepted into the context."""

    name = "drafter"

    def begin(self, context: list[int]) -> None:
        """A new prompt starts (``context`` = prompt ids)."""

    def propose(self, context: list[int], tree: CandidateTree, stats: AcceptanceStats) -> None:
        raise NotImplementedError

    def observe(self, token: int, logits: torch.Tensor) -> None:
        """The model's logits after ``token`` at some verified node."""

    def observe_rows(self, tokens: list[int], logits: torch.Tensor) -> None:
        """The model's logits (``[len(tokens), vocab]``) after each of ``tokens``: rows the verifier
        computed anyway at nodes the walk did not visit (rejected branches)."""
        for token, row in zip(tokens, logits):
            self.observe(token, row)

    def extend(self, context: list[int], added: int) -> None:
        """``added`` tokens were appended to ``context``."""

    def end(self, context: list[int]) -> None:
        """The prompt's generation finished (``context`` = prompt + output)."""
