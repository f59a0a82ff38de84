"""Lossless draft-free speculative decoding: drafters (``recycling``, ``prompt_lookup``,
``lookahead``, ``auto`` = all in one tree), tree verification through the tokensift attention
function, cache rollback, a measured cost curve and cost-aware adaptive tree sizes."""

from tokensift.speculative.adaptive import AcceptanceStats, choose_size
from tokensift.speculative.cost import CostModel, cost_for, measure_cost
from tokensift.speculative.engine import DRAFTER_NAMES, SpecResult, Speculator, build_drafters, speculative_generate
from tokensift.speculative.tree import CandidateTree, DraftTree

__all__ = [
    "AcceptanceStats", "CandidateTree", "CostModel", "DRAFTER_NAMES", "DraftTree", "SpecResult", "Speculator",
    "build_drafters", "choose_size", "cost_for", "measure_cost", "speculative_generate",
]
