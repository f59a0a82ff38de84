"""Cost-aware adaptive drafting (after SpecDec++): per-key acceptance history and the choice of
how many tree nodes to verify.

Every drafted node carries the stats keys of the drafters that proposed it (drafter, depth,
sibling rank or n-gram length...). ``AcceptanceStats`` keeps a forgetting average of
P(node accepted | parent accepted) per key. A node's path probability is the product of its
ancestors' rates; the expected number of accepted draft tokens of a tree is the sum of its
nodes' path probabilities. ``choose_size`` picks the number of nodes ``n`` (among the sizes
the cost curve was measured at) maximising ``(1 + E[accepted]) / cost(1 + n)``; ``n = 0``
(plain decoding, ratio 1) wins whenever nothing is likely enough to pay for its cost.
``PromptCalibration`` corrects the estimates with what this prompt has really accepted.
"""

from __future__ import annotations


class AcceptanceStats:
    """Forgetting averages of acceptance per key, with a prior.

    Parameters
    ----------
    prior : float, default 0.15
        Acceptance rate assumed for a key before it has been tried.
    prior_weight : float, default 2.0
        How many tries the prior counts as.
    decay : float, default 0.97
        Weight kept by the past at each new try of a key (1.0: a plain average).
    """

    def __init__(self, prior: float = 0.15, prior_weight: float = 2.0, decay: float = 0.97):
        self.prior, self.prior_weight, self.decay = prior, prior_weight, decay
        self.table: dict = {}  # key -> [accepted, tried]

    def rate(self, key) -> float:
        accepted, tried = self.table.get(key, (0.0, 0.0))
        return (accepted + self.prior * self.prior_weight) / (tried + self.prior_weight)

    def record(self, key, accepted: bool) -> None:
        entry = self.table.setdefault(key, [0.0, 0.0])
        entry[0] = entry[0] * self.decay + float(accepted)
        entry[1] = entry[1] * self.decay + 1.0

    def state_dict(self) -> dict:
        return {"prior": self.prior, "prior_weight": self.prior_weight, "decay": self.decay,
                "table": [[list(k) if isinstance(k, tuple) else k, v] for k, v in self.table.items()]}


def choose_size(probs: list[float], cost, max_nodes: int, lazy_head: bool = True, margin: float = 1.05) -> tuple[int, float]:
    """Best number of draft nodes for ranked path probabilities ``probs``; returns (n, gain).

    ``gain`` is the expected tokens per unit cost relative to plain decoding (1.0 at n = 0); a
    tree is verified only when its expected gain beats plain decoding by ``margin`` (estimates
    are noisy, and losing to plain decoding is worse than missing a small win).
    """
    best_n, best_gain = 0, margin
    prefix = [0.0]
    for p in probs[:max_nodes]:
        prefix.append(prefix[-1] + p)
    for q in cost.sizes:
        n = q - 1
        if n <= 0 or n > len(probs) or n > max_nodes:
            continue
        expected = prefix[n]
        rows = min(q, 1.0 + expected) if lazy_head else q
        gain = (1.0 + expected) / cost.relative(q, rows, speculative=True, lazy=lazy_head)
        if gain > best_gain:
            best_n, best_gain = n, gain
    return best_n, (best_gain if best_n else 1.0)


class PromptCalibration:
    """Realized / predicted accepted draft tokens on the current prompt (a forgetting ratio).

    The acceptance history is shared across prompts, so on a prompt unlike the earlier ones
    (a summary after code) it can promise far more than drafts deliver. Path probabilities are
    multiplied by this ratio, so after a few failed trees the expected gain falls below the
    cost and the loop decodes plainly; every ``probe_every`` plain steps a probe verifies the tree
    the uncorrected history would pick, which keeps the ratio current (on a flat cost curve a
    probe costs little more than the plain step it replaces).
    """

    def __init__(self, decay: float = 0.8, prior_weight: float = 1.0, ceiling: float = 2.0, probe_every: int = 8):
        self.decay, self.ceiling, self.probe_every = decay, ceiling, probe_every
        self.predicted = self.realized = prior_weight  # prior: the estimates are right
        self.plain_steps = 0

    def factor(self) -> float:
        return min(self.realized / self.predicted, self.ceiling)

    def scaled(self, probs: list[float]) -> list[float]:
        factor = self.factor()
        return [min(p * factor, 1.0) for p in probs]

    def record(self, predicted: float, realized: int) -> None:
        """A verified tree whose estimates summed to ``predicted`` yielded ``realized`` drafts."""
        self.predicted = self.decay * self.predicted + predicted
        self.realized = self.decay * self.realized + realized
        self.plain_steps = 0

    def probe_due(self) -> bool:
        """Count a plain step; True when it is time to verify one node to re-measure."""
        self.plain_steps += 1
        return self.plain_steps >= self.probe_every
