"""``full`` prefill: every prompt token through every layer (the engine's plain prefill)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokensift.prefill.base import PrefillPolicy, register


@register
@dataclass
class FullPrefill(PrefillPolicy):
    """Compute every prompt token at every layer: exactly the engine's prefill without a policy.

    Parameters
    ----------
    None.
    """

    name = "full"
    paper = "-"

    @property
    def prunes(self) -> bool:
        return False

    def run(self, model, cache, ids: torch.Tensor) -> torch.Tensor:
        from tokensift.generate import Decoder

        return Decoder(model, cache).forward(ids, torch.ones_like(ids))
