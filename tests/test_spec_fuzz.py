"""Losslessness at scale: speculative greedy == plain greedy over many random (prompt, drafter,
tree size, policy, prefill chunk) combinations on tiny models; under sampling, a chi-square test
that speculative sampling draws two-token continuations from exactly the plain distribution,
with a mutation check proving the test catches a biased acceptance rule.

``TOKENSIFT_FUZZ=long`` runs ``SPEC_COMBINATIONS`` (default 1200) greedy combinations instead of
the default run's 120.
"""

from __future__ import annotations

import os
import random

import pytest
import torch
from scipy.stats import chi2

from conftest import TinyTokenizer, random_ids, tiny_gemma3, tiny_llama, tiny_qwen2
from tokensift.errors import TokensiftError
from tokensift.generate import generate
from tokensift.policies import POLICIES, build_policy
from tokensift.speculative import CostModel, Speculator
from tokensift.speculative.tree import DraftTree

LONG = os.environ.get("TOKENSIFT_FUZZ") == "long"
COMBINATIONS = int(os.environ.get("SPEC_COMBINATIONS", "1200")) if LONG else 120
DRAFTERS = ("recycling", "prompt_lookup", "lookahead", "auto")
P_THRESHOLD = 1e-3  # the sampling test fails when the chi-square p-value is below this
READERS = sorted(name for name, cls in POLICIES.items() if getattr(cls, "reads_subset", False) and name != "tiered")
EVICTORS = ["snapkv", "h2o", "tova", "knorm", "a2sf", "streaming_llm", "random", "vatp", "sepllm", "caote(snapkv)",
            "graphkv(h2o)", "adakv(snapkv)"]


def lossless_policy(rng: random.Random, total: int):
    """A policy under which plain decoding is exact: ``full``, or any evicting/reading policy whose
    budget no layer reaches (it still observes, scores and stores through its own layers)."""
    kind = rng.choice(["full", "evict", "read"])
    budget = total + rng.randint(1, 40)
    if kind == "full":
        return build_policy("full")
    if kind == "evict":
        return build_policy(rng.choice(EVICTORS), budget=budget, n_sink=rng.randint(0, 4), window=rng.randint(0, 8))
    return build_policy(rng.choice(READERS), k=budget, n_sink=rng.randint(0, 4), window=rng.randint(0, 8))


def random_prompt(rng: random.Random) -> list[int]:
    """1-80 random ids, often with a repeated stretch (so lookup drafters find matches)."""
    ids = [rng.randint(1, 127) for _ in range(rng.randint(1, 80))]
    if len(ids) > 3 and rng.random() < 0.6:
        start = rng.randrange(len(ids) - 2)
        ids += ids[start:start + rng.randint(2, 12)]
    return ids


def test_greedy_identical_on_random_combinations():
    rng = random.Random(20)
    models = {"llama": tiny_llama(), "qwen2": tiny_qwen2()}
    tokenizer = TinyTokenizer()
    speculators = {}
    tried = steps = tokens = 0
    for _ in range(COMBINATIONS):
        name = rng.choice(sorted(models))
        net = models[name]
        drafter = rng.choice(DRAFTERS)
        nodes = rng.choice([None, 0, 1, 2, 3, 5, 8, 13, 24, 40, 63])
        key = (name, drafter, nodes)
        if key not in speculators or rng.random() < 0.3:  # state carried across prompts, sometimes fresh
            speculators[key] = Speculator(net, drafter, fixed_nodes=nodes, cost=CostModel.synthetic(0.02), packed=rng.random() < 0.5)
        ids = random_prompt(rng)
        new = rng.randint(1, 16)
        chunk = rng.choice([None, None, 1, 7, 32])
        policy = lossless_policy(rng, len(ids) + new + 64)
        plain = generate(net, tokenizer, ids, policy=policy, max_new_tokens=new).token_ids[0]
        result = speculators[key].generate(tokenizer, ids, policy=policy, max_new_tokens=new, prefill_chunk=chunk)
        assert result.token_ids == plain, (key, ids, policy.describe(), chunk)
        tried, steps, tokens = tried + 1, steps + result.steps, tokens + result.new_tokens
        if LONG and tried % 50 == 0:  # progress of a long run (pytest -s)
            print(f"greedy speculation: {tried} combinations identical, {tokens / steps:.2f} tokens/step", flush=True)
    assert tried == COMBINATIONS
    assert tokens / steps > 1.1  # drafts were accepted, not only verified


def test_sliding_window_model_is_a_clear_error():
    with pytest.raises(TokensiftError, match="full attention"):
        Speculator(tiny_gemma3(), "auto")


# ------------------------------------------------------------------------------ sampling
def exact_pairs(net, ids, temperature, top_p) -> dict[tuple[int, int], float]:
    """P(first two sampled tokens) of plain sampling, computed exactly."""
    def dist(logits):
        probs = torch.softmax(logits / temperature, dim=-1)
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        outside = sorted_probs.cumsum(dim=-1) - sorted_probs > top_p
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs.masked_fill(outside, 0.0))
        return probs / probs.sum(-1, keepdim=True)

    with torch.inference_mode():
        first = dist(net(torch.tensor([ids])).logits[0, -1].float())
        support = first.nonzero().flatten().tolist()
        second = dist(net(torch.tensor([ids + [t] for t in support])).logits[:, -1].float())
    return {(a, b): float(first[a] * second[i, b]) for i, a in enumerate(support) for b in second[i].nonzero().flatten().tolist()}


def chi_square_p(counts: dict, probs: dict, runs: int) -> float:
    """Pearson chi-square p-value of observed pair counts against exact probabilities (bins with
    expected count < 5 pooled; a pair of probability 0 observed at all gives p = 0)."""
    if any(pair not in probs for pair in counts):
        return 0.0
    expected, observed, pool_e, pool_o = [], [], 0.0, 0.0
    for pair, p in sorted(probs.items(), key=lambda item: -item[1]):
        if p * runs >= 5:
            expected.append(p * runs), observed.append(counts.get(pair, 0))
        else:
            pool_e, pool_o = pool_e + p * runs, pool_o + counts.get(pair, 0)
    if pool_e > 0:
        expected.append(pool_e), observed.append(pool_o)
    statistic = sum((o - e) ** 2 / e for o, e in zip(observed, expected))
    return float(chi2.sf(statistic, max(len(expected) - 1, 1)))


def sampled_pairs(net, ids, runs, temperature, top_p) -> tuple[dict, int]:
    speculator = Speculator(net, "recycling", fixed_nodes=8)
    counts, steps = {}, 0
    for seed in range(runs):
        result = speculator.generate(TinyTokenizer(), ids, max_new_tokens=2, temperature=temperature, top_p=top_p, seed=seed)
        pair = tuple(result.token_ids)
        counts[pair] = counts.get(pair, 0) + 1
        steps += result.steps
    return counts, steps


def peaked_model():
    net = tiny_llama(seed=1)
    with torch.no_grad():
        net.lm_head.weight.mul_(25.0)  # peaked distributions: drafts get accepted often
    return net


RUNS, TEMPERATURE, TOP_P = 400, 0.8, 0.95


@pytest.mark.parametrize("prompt_seed", [7])
def test_sampled_pairs_follow_the_plain_distribution(prompt_seed):
    """400 seeds: the joint law of the first two sampled tokens (accepted draft + bonus
    token) equals plain sampling's, exactly computed; chi-square p >= 0.001."""
    net = peaked_model()
    ids = random_ids(12, seed=prompt_seed)[0].tolist()
    counts, steps = sampled_pairs(net, ids, RUNS, TEMPERATURE, TOP_P)
    assert steps < 1.8 * RUNS  # most second tokens came from accepted draft nodes
    assert chi_square_p(counts, exact_pairs(net, ids, TEMPERATURE, TOP_P), RUNS) >= P_THRESHOLD


class BiasedChildren(dict):
    """A deliberately wrong acceptance rule: when the model's sample is not a drafted child, accept
    the first drafted child anyway one time in two."""

    rng = random.Random(0)

    def get(self, token, default=None):
        if token not in self and self and self.rng.random() < 1 / 2:
            return next(iter(self.values()))
        return super().get(token, default)


def test_chi_square_catches_a_biased_acceptance_rule(monkeypatch):
    """Mutation check: the same test, run on a speculator that accepts drafts it should reject,
    fails by a wide margin (p far below the threshold)."""
    original = DraftTree.children
    monkeypatch.setattr(DraftTree, "children", lambda self, node: BiasedChildren(original(self, node)))
    net = peaked_model()
    ids = random_ids(12, seed=7)[0].tolist()
    counts, _ = sampled_pairs(net, ids, RUNS, TEMPERATURE, TOP_P)
    assert chi_square_p(counts, exact_pairs(net, ids, TEMPERATURE, TOP_P), RUNS) < P_THRESHOLD / 1000
