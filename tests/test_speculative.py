"""Lossless draft-free speculative decoding: identical greedy output, exact sampling
distribution, rollback == plain prefill, recycling state round-trip, one-line errors."""

import math

import pytest
import torch
from conftest import TinyTokenizer, random_ids, tiny_llama, tiny_qwen2

from tokensift import cli
from tokensift.engine import make_cache
from tokensift.errors import TokensiftError
from tokensift.generate import generate
from tokensift.policies import build_policy
from tokensift.speculative import AcceptanceStats, CandidateTree, CostModel, DraftTree, Speculator, choose_size
from tokensift.speculative.cost import MIN_OBSERVATIONS
from tokensift.speculative.recycling import Recycling, template

CHEAP = CostModel.synthetic(0.02)  # verification nearly free: the adaptive tree drafts a lot


def prompts(count: int, seed: int):
    """Random prompts, half with a repeated stretch so lookup drafters find matches."""
    out = []
    for i in range(count):
        ids = random_ids(6 + (i * 7) % 30, seed=seed + i)[0].tolist()
        if i % 2:
            ids = ids + ids[: 3 + i % 8]
        out.append(ids)
    return out


@pytest.mark.parametrize("make, drafter, fixed", [
    (tiny_llama, "auto", None),
    (tiny_llama, "recycling", 12),
    (tiny_qwen2, "prompt_lookup", 6),
    (tiny_qwen2, "lookahead", None),
])
def test_greedy_identical_to_plain(make, drafter, fixed):
    """4 x 50 = 200 random prompts: speculative greedy == plain greedy, token for token."""
    model, tokenizer = make(), TinyTokenizer()
    speculator = Speculator(model, drafter, cost=CHEAP, fixed_nodes=fixed)  # state kept across prompts
    steps = tokens = 0
    for ids in prompts(50, seed=len(drafter)):
        plain = generate(model, tokenizer, ids, max_new_tokens=12).token_ids[0]
        result = speculator.generate(tokenizer, ids, max_new_tokens=12)
        assert result.token_ids == plain
        steps, tokens = steps + result.steps, tokens + result.new_tokens
    assert tokens / steps > 1.1  # the drafts were actually accepted, not just verified


def test_greedy_identical_under_compressed_cache():
    """Speculation over an evicting cache runs, stays within budget and equals plain
    decoding while nothing is evicted yet; after eviction it is exact w.r.t. its own cache."""
    model, tokenizer = tiny_llama(), TinyTokenizer()
    ids = random_ids(60, seed=3)[0].tolist()
    policy = build_policy("streaming_llm", budget=48)
    result = Speculator(model, "auto", cost=CHEAP).generate(tokenizer, ids, policy=policy, max_new_tokens=30)
    assert result.new_tokens == 30 and result.kv_tokens <= 48 + 1
    big = build_policy("streaming_llm", budget=400)
    plain = generate(model, tokenizer, ids, policy=big, max_new_tokens=30).token_ids[0]
    spec = Speculator(model, "auto", cost=CHEAP).generate(tokenizer, ids, policy=big, max_new_tokens=30)
    assert spec.token_ids == plain


def test_rollback_equals_plain_prefill():
    """Verifying a tree and keeping its accepted path leaves the cache equal to plain prefill."""
    model = tiny_llama()
    ids = random_ids(20, seed=5)[0].tolist()
    speculator = Speculator(model, "prompt_lookup", fixed_nodes=8)
    cache = make_cache(model, build_policy("full"))
    with torch.inference_mode():
        model.model(input_ids=torch.tensor([ids[:-1]]), past_key_values=cache, use_cache=True)
        # a tree whose first branch is the model's own greedy continuation, plus decoys
        greedy = generate(model, TinyTokenizer(), ids, max_new_tokens=4).token_ids[0]
        tree = CandidateTree(ids[-1])
        tree.add_path([7, 9], [0.5, 0.5], ["a", "a"])
        tree.add_path(greedy[:3], [0.9] * 3, ["b"] * 3)
        tree.add_path([greedy[0], 11], [0.4, 0.4], ["c", "c"])
        draft = tree.subtree(tree.ranked())
        path, bonus = speculator.verify(draft, cache, 0.0, 1.0, torch.Generator())
    accepted = [draft.tokens[i] for i in path]
    assert accepted[1:] == greedy[:3] and bonus == greedy[3]
    reference = make_cache(model, build_policy("full"))
    with torch.inference_mode():
        model.model(input_ids=torch.tensor([ids[:-1] + accepted]), past_key_values=reference, use_cache=True)
    for layer, ref in zip(cache.layers, reference.layers):
        assert layer.seen == ref.seen and layer.kept == ref.kept
        torch.testing.assert_close(layer.keys, ref.keys, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(layer.values, ref.values, atol=1e-5, rtol=1e-4)
        assert torch.equal(layer.positions, ref.positions) and torch.equal(layer.ranks, ref.ranks)
        assert torch.equal(layer.valid, ref.valid) and torch.equal(layer.sink, ref.sink)
        assert torch.equal(layer.valid_seen, ref.valid_seen)


def test_tree_mask_and_positions():
    tree = DraftTree([5, 1, 2, 3, 4], [-1, 0, 0, 1, 3], [0, 1, 1, 2, 3], [[]] * 5)
    mask = tree.attention_mask(10)
    assert mask.shape == (1, 1, 5, 15) and bool(mask[..., :10].all())
    expected = torch.tensor([[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 0, 1, 0, 0], [1, 1, 0, 1, 0], [1, 1, 0, 1, 1]]).bool()
    assert torch.equal(mask[0, 0, :, 10:], expected)
    assert tree.position_ids(10).tolist() == [[10, 11, 11, 12, 13]]


def exact_two_token_marginals(model, ids, temperature, top_p):
    """P(first new token) and P(second new token) of plain sampling, computed exactly."""
    from tokensift.generate import choose_next  # noqa: F401  (same transform as below)

    def dist(logits):
        probs = torch.softmax(logits / temperature, dim=-1)
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        outside = sorted_probs.cumsum(dim=-1) - sorted_probs > top_p
        sorted_probs = sorted_probs.masked_fill(outside, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
        return probs / probs.sum(-1, keepdim=True)

    with torch.inference_mode():
        first = dist(model(torch.tensor([ids])).logits[0, -1].float())
        support = first.nonzero().flatten()
        batch = torch.tensor([ids + [int(t)] for t in support])
        second = (first[support, None] * dist(model(batch).logits[:, -1].float())).sum(0)
    return first, second


def test_sampling_distribution_matches_plain():
    """Chi-square: the first two sampled tokens follow the model's exact distribution."""
    model = tiny_llama(seed=1)
    with torch.no_grad():
        model.lm_head.weight.mul_(25.0)  # peaked distributions: drafts get accepted often
    tokenizer, temperature, top_p = TinyTokenizer(), 0.8, 0.95
    ids = random_ids(12, seed=7)[0].tolist()
    first, second = exact_two_token_marginals(model, ids, temperature, top_p)
    speculator = Speculator(model, "recycling", fixed_nodes=8)
    runs, counts1, counts2, steps = 400, torch.zeros(128), torch.zeros(128), 0
    for seed in range(runs):
        result = speculator.generate(tokenizer, ids, max_new_tokens=2, temperature=temperature, top_p=top_p, seed=seed)
        counts1[result.token_ids[0]] += 1
        counts2[result.token_ids[1]] += 1
        steps += result.steps
    assert steps < 1.8 * runs  # most second tokens came from accepted draft nodes
    for counts, probs in ((counts1, first), (counts2, second)):
        assert counts[probs == 0].sum() == 0
        # pool rare bins, then a chi-square test at p = 0.001
        order = probs.argsort(descending=True)
        expected, observed, pool_e, pool_o = [], [], 0.0, 0.0
        for index in order.tolist():
            e = float(probs[index]) * runs
            if e >= 5:
                expected.append(e), observed.append(float(counts[index]))
            else:
                pool_e, pool_o = pool_e + e, pool_o + float(counts[index])
        if pool_e > 0:
            expected.append(pool_e), observed.append(pool_o)
        chi2 = sum((o - e) ** 2 / e for o, e in zip(observed, expected))
        dof = max(len(expected) - 1, 1)
        critical = dof + 3.09 * math.sqrt(2 * dof) + 6  # ~ chi2 quantile 0.999 (Wilson-Hilferty-ish margin)
        assert chi2 < critical, (chi2, dof)


def test_recycling_state_round_trip(tmp_path):
    model, tokenizer = tiny_qwen2(), TinyTokenizer()
    speculator = Speculator(model, "recycling", fixed_nodes=10)
    speculator.generate(tokenizer, random_ids(20, seed=2)[0].tolist(), max_new_tokens=10)
    drafter = speculator.drafters[0]
    assert (drafter.adjacency >= 0).any()
    path = tmp_path / "recycling.state"
    drafter.save(path)
    loaded = Recycling.load(path)
    assert (loaded.adjacency == drafter.adjacency).all() and loaded.widths == drafter.widths
    assert drafter.adjacency.nbytes < 2 * 2**20 * 128 / 49152 + 1  # k * vocab int32 (1.5 MB at 49152)
    assert len(template()) <= 81  # the paper's template has 80 nodes


def test_recycling_observe_rows_sets_each_tokens_top_k():
    drafter = Recycling(50, k=3)
    logits = torch.randn(3, 50)
    drafter.observe_rows([7, 9, 7], logits)
    assert drafter.adjacency[9].tolist() == torch.topk(logits[1], 3).indices.tolist()
    assert drafter.adjacency[7].tolist() == torch.topk(logits[2], 3).indices.tolist()  # the last row wins
    assert (drafter.adjacency[8] == -1).all()


def test_rejected_tree_rows_reach_the_drafters():
    """With the output layer run over every tree row (packed kernels), the drafters also see the
    rows of nodes the walk rejected (Token Recycling refreshes every node); output unchanged."""
    model, tokenizer = tiny_llama(), TinyTokenizer()

    class Recording(Recycling):
        def observe_rows(self, tokens, logits):
            assert logits.shape == (len(tokens), self.vocab_size)
            self.rejected = getattr(self, "rejected", []) + list(tokens)
            super().observe_rows(tokens, logits)

    drafter = Recording(model.config.vocab_size)
    ids = random_ids(30, seed=5)[0].tolist()
    speculator = Speculator(model, [drafter], fixed_nodes=12)
    result = speculator.generate(tokenizer, ids, max_new_tokens=20)
    if speculator.kernels != "packed":
        pytest.skip("no packed kernels here: the output layer runs row by row on visited nodes only")
    assert result.token_ids == generate(model, tokenizer, ids, max_new_tokens=20).token_ids[0]
    assert drafter.rejected and set(drafter.rejected) <= set(range(model.config.vocab_size))


def test_adaptive_size_drafts_nothing_when_unlikely():
    cost = CostModel.synthetic(0.1)
    assert choose_size([0.05] * 30, cost, 63)[0] == 0
    n, gain = choose_size([0.95 ** i for i in range(1, 40)], cost, 63)
    assert n > 4 and gain > 1.5
    stats = AcceptanceStats()
    for _ in range(50):
        stats.record("k", True)
    assert stats.rate("k") > 0.9


def test_bad_input_is_an_error():
    model = tiny_llama()
    with pytest.raises(TokensiftError, match="unknown drafter"):
        Speculator(model, "nope")
    with pytest.raises(TokensiftError, match="does not fit"):
        Speculator(model, "auto", fixed_nodes=600).generate(TinyTokenizer(), "1 2 3", max_new_tokens=500)


def run_cli(monkeypatch, capsys, *args):
    monkeypatch.setattr("sys.argv", ["tokensift", *args])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    captured = capsys.readouterr()
    return exit_info.value.code, captured.err


@pytest.mark.parametrize("args, fragment", [
    (["--speculate", "nope"], "unknown drafter 'nope'"),
    (["--tree-nodes", "4"], "need --speculate"),
    (["--speculate", "auto", "--question", "q"], "not supported"),
])
def test_cli_errors_are_one_line(monkeypatch, capsys, args, fragment):
    code, err = run_cli(monkeypatch, capsys, "generate", "--prompt", "hi", *args)
    assert code == 2 and fragment in err and len(err.strip().splitlines()) == 1


@pytest.mark.real
def test_real_model_greedy_identical():
    """SmolLM2: speculative greedy == transformers' plain greedy on a few prompts."""
    from tokensift.models import load_model

    model, tokenizer = load_model()
    speculator = Speculator(model, "auto", cost=CostModel.synthetic(0.05))
    fixed = Speculator(model, "auto", fixed_nodes=12)
    texts = [
        "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
        "Repeat this sentence exactly: The quick brown fox jumps over the lazy dog near the river bank.",
        "The capital of France is",
        "List three colors: red, green,",
    ]
    total_steps = total_tokens = 0
    for text in texts:
        ids = tokenizer(text)["input_ids"]
        with torch.inference_mode():
            plain = model.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False)[0, len(ids):].tolist()
        for spec in (speculator, fixed):
            result = spec.generate(tokenizer, text, max_new_tokens=16, stop_at_eos=False)
            assert result.token_ids == plain[: len(result.token_ids)] and len(result.token_ids) == len(plain)
            total_steps, total_tokens = total_steps + result.steps, total_tokens + result.new_tokens
    assert total_tokens / total_steps > 1.05


def test_online_cost_calibration_stops_unpaid_drafting():
    """When real steps show verification is expensive, the adaptive tree shrinks to nothing."""
    cost = CostModel.synthetic(0.01)
    cost.online = True
    probs = [0.5, 0.3, 0.2, 0.1]
    assert choose_size(probs, cost, 63)[0] > 0
    cost.observe(1, 0.1)
    for q in (2, 3, 4, 5):
        cost.observe(q, 0.25)
    assert choose_size(probs, cost, 63)[0] > 0  # one slow step per size decides nothing yet
    for _ in range(MIN_OBSERVATIONS - 1):
        cost.observe(1, 0.1)
        for q in (2, 3, 4, 5):
            cost.observe(q, 0.25)
    assert choose_size(probs, cost, 63)[0] == 0


class ConfidentlyWrong:
    """A drafter whose history claims 95% acceptance but whose drafts are a fixed chain."""

    name = "wrong"

    def begin(self, context):
        pass

    def propose(self, context, tree, stats):
        keys = [(self.name, depth) for depth in range(1, 5)]
        tree.add_path([7, 7, 7, 7], [stats.rate(k) for k in keys], keys)

    def observe(self, token, logits):
        pass

    def extend(self, context, added):
        pass

    def end(self, context):
        pass


@pytest.mark.parametrize("calibrated", [True, False])
def test_prompt_calibration_stops_drafts_the_history_oversells(monkeypatch, calibrated):
    """Drafts that keep failing on this prompt stop after a few trees, whatever the history says."""
    from tokensift.speculative.adaptive import PromptCalibration

    if not calibrated:
        monkeypatch.setattr(PromptCalibration, "factor", lambda self: 1.0)
    model, tokenizer = tiny_llama(), TinyTokenizer()
    ids = random_ids(20, seed=1)[0].tolist()
    plain = generate(model, tokenizer, ids, max_new_tokens=48).token_ids[0]
    assert plain.count(7) <= 2  # the chain is indeed wrong for this prompt
    stats = AcceptanceStats(prior=0.95, prior_weight=1e6)
    speculator = Speculator(model, [ConfidentlyWrong()], cost=CostModel.synthetic(0.1), stats=stats)
    result = speculator.generate(tokenizer, ids, max_new_tokens=48)
    assert result.token_ids == plain
    if calibrated:
        assert result.mean_tree_nodes < 1.0  # a few failed trees, then a probe tree every 8 plain steps
    else:
        assert result.mean_tree_nodes > 3.5


def test_spec_report_ratios_per_category(tmp_path):
    """The spec report's per-category speedups are same-prompt tokens/s ratios (geometric mean)."""
    from tokensift.bench.spec_suite import CATEGORIES, write_report

    rates = {"plain": 10.0, "hf_lookup_3": 12.0, "hf_lookup_10": 8.0, "auto": 20.0, "plain_packed": 12.5}
    records = [{"category": category, "prompt": f"{category}-{i}", "method": method, "steps": 10,
                "tokens_per_second": rate * (i + 1), "accepted_per_step": 2.0, "identical_to_plain": True}
               for category in CATEGORIES for i in range(2) for method, rate in rates.items()]
    curve = {q: 1.0 for q in (1, 2)}
    curves = {"stock_all_rows": curve, "stock_lazy_head_2_rows": curve, "packed_all_rows": curve,
              "body_ms": {}, "packed_body_ms": {}, "head_ms": {}, "packed_head_ms": {}}
    write_report(tmp_path, records, curves, (0, 0, 0), (0, 0, 0), 2, 128, 2)
    text = (tmp_path / "report.md").read_text()
    assert "| code | 2.00 | 15.00 | 18.00 | 12.00 | 30.00 | 2.00x | 1.67x | 2.50x | 1.20x | 0.80x | 1.25x | 1.60x |" in text
    assert "| overall |" in text and "Outputs identical to plain greedy: 40/40 runs." in text
