"""The exact greedy int8 output layer (tokensift.exact_head): the bound holds, the argmax is the
fp32 argmax (near-ties included), and greedy decoding, plain or speculative, gives the same tokens
with it as without; with sampling it falls back to the fp32 layer (same output)."""

import pytest
import torch
from conftest import TinyTokenizer, random_ids, tiny_llama, tiny_qwen2

from tokensift import cli
from tokensift.exact_head import ExactGreedyHead, available, exact_greedy_head, exact_head, quantize_activations
from tokensift.generate import generate
from tokensift.kernels import packed_linears
from tokensift.speculative import CandidateTree, CostModel, DraftTree, Speculator

pytestmark = pytest.mark.skipif(not available(torch.nn.Linear(4, 4)), reason="no fbgemm int8 kernels in this build")


def random_head(vocab: int = 1000, hidden: int = 64, seed: int = 0) -> tuple[torch.Tensor, ExactGreedyHead]:
    """A weight with uneven rows and a few large columns (outlier channels), and its exact head."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(vocab, hidden, generator=generator) * 0.05
    weight *= torch.rand(vocab, 1, generator=generator) * 3 + 0.1  # rows of different scales
    weight[:, :3] *= 8
    return weight, ExactGreedyHead(weight)


def random_hidden(rows: int, hidden: int = 64, seed: int = 1) -> torch.Tensor:
    """Hidden states of several magnitudes, with outliers, and an all-zero one."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, hidden, generator=generator)
    x *= torch.logspace(-3, 2, rows)[:, None]
    x[::3, 5] *= 40  # outlier channels
    x[-1] = 0
    return x


def test_activation_levels_are_exact():
    x = random_hidden(30)
    levels, top, stretch, remainder, scales = quantize_activations(x)
    first, second = levels[:30] / top, levels[30:] / top
    assert torch.equal(first, first.round()) and torch.equal(second, second.round())
    assert first.abs().max() <= 63 and second.abs().max() <= 32
    scales = torch.tensor(scales, dtype=torch.float64)[:, None]
    assert (remainder.abs() <= scales / 128).all()
    assert torch.equal(stretch.double(), top / scales)
    assert torch.equal(x.double(), scales * (first.double() + second.double() / 64) + remainder.double())


@pytest.mark.parametrize("seed", range(4))
def test_bound_holds_on_random_inputs(seed):
    """|exact - approx| <= b_v for every entry, exact in float64 and in fp32."""
    weight, head = random_head(seed=seed)
    x = random_hidden(40, seed=seed + 10)
    approx, remainder, scales = head.approximate(x)
    exact64 = x.double() @ weight.double().t()
    exact32 = (x @ weight.t()).double()
    for row, terms in enumerate(head.row_terms(x, remainder, scales)):
        bound = head.entry_bounds(terms).double()
        assert ((exact64[row] - approx[row].double()).abs() <= bound).all()
        assert ((exact32[row] - approx[row].double()).abs() <= bound).all()
        spread = exact64[row].max() - exact64[row].min()
        assert bound.max() < spread / 4 or row == len(x) - 1  # it can rule entries out (but in the zero row)


def test_argmax_equals_fp32_on_many_hidden_states():
    weight, head = random_head(vocab=3000, seed=5)
    x = torch.randn(300, 64, generator=torch.Generator().manual_seed(6)) * 2
    rows = head(x)
    reference = x @ weight.t()
    assert torch.equal(rows.argmax(-1), reference.argmax(-1))
    assert head.full_rows == 0 and head.candidate_rows < 300 * 3000 / 10


def test_argmax_on_constructed_near_ties():
    """Two rows whose logits differ by 1e-3..1e-4 at the top: int8 cannot tell them apart (it
    picks the wrong one in some trials), the exact head always picks the fp32 argmax."""
    generator = torch.Generator().manual_seed(7)
    wrong_approx = 0
    for trial in range(60):
        weight = torch.randn(500, 64, generator=generator) * 0.05
        x = torch.randn(64, generator=generator)
        base = 0.6 * x / x.norm() + torch.randn(64, generator=generator) * 0.02  # the largest logit by far
        noise = torch.randn(64, generator=generator) * 1e-3
        noise -= noise.dot(x) / x.dot(x) * x  # changes the row, not its logit
        gap = 10.0 ** -(3 + trial % 2) * (1 if trial % 4 < 2 else -1)
        i, j = sorted(torch.randperm(500, generator=generator)[:2].tolist())
        weight[i], weight[j] = base, base + noise + gap * x / x.dot(x)  # e_j - e_i = gap
        head = ExactGreedyHead(weight)
        reference = int((x @ weight.t()).argmax())
        assert reference in (i, j)
        assert int(head.argmax(x)) == reference
        approx, _, _ = head.approximate(x[None])
        wrong_approx += int(approx[0].argmax()) != reference
    assert wrong_approx > 0  # the near-ties were real: int8 alone got some wrong


def test_fallbacks_full_rows():
    weight, head = random_head()
    head.max_candidates = 0  # every row falls back to the fp32 layer
    x = random_hidden(5)
    assert torch.allclose(head(x), x @ weight.t(), atol=1e-5) and head.full_rows == 5
    bad = x.clone()
    bad[0, 0] = float("nan")
    assert torch.isnan(ExactGreedyHead(weight)(bad)[0]).all()


def test_context_swaps_and_restores_the_output_layer():
    model = tiny_llama()
    linear = model.get_output_embeddings()
    with exact_greedy_head(model) as head:
        assert head is exact_head(model) and linear.forward == head.forward
        with exact_greedy_head(model) as inner:  # nested: the same head, restored by the outer block
            assert inner is head
        assert linear.forward == head.forward
    assert "forward" not in vars(linear)
    with packed_linears(model):
        packed = linear.forward
        with exact_greedy_head(model):
            assert linear.forward != packed
        assert linear.forward == packed  # the packed forward comes back
    with exact_greedy_head(model, enabled=False) as off:
        assert off is None and "forward" not in vars(linear)


@pytest.mark.parametrize("make", [tiny_llama, tiny_qwen2])
def test_greedy_generate_identical_with_the_flag(make):
    model, tokenizer = make(), TinyTokenizer()
    for seed in range(6):
        ids = random_ids(8 + 5 * seed, seed=seed)[0].tolist()
        plain = generate(model, tokenizer, ids, max_new_tokens=16).token_ids
        rows = exact_head(model).rows
        exact = generate(model, tokenizer, ids, max_new_tokens=16, exact_int8_head=True).token_ids
        assert exact == plain
        assert exact_head(model).rows - rows == 16  # prefill's row + 15 decode steps went through it
    batch = [random_ids(9, seed=20)[0].tolist(), random_ids(14, seed=21)[0].tolist()]
    assert generate(model, tokenizer, batch, max_new_tokens=8, exact_int8_head=True).token_ids == \
        generate(model, tokenizer, batch, max_new_tokens=8).token_ids


@pytest.mark.parametrize("make, drafter, fixed", [(tiny_llama, "auto", None), (tiny_qwen2, "prompt_lookup", 6)])
def test_speculative_greedy_with_the_flag_identical_to_plain(make, drafter, fixed):
    model, tokenizer = make(), TinyTokenizer()
    speculator = Speculator(model, drafter, cost=CostModel.synthetic(0.02), fixed_nodes=fixed, exact_int8_head=True)
    steps = tokens = 0
    for seed in range(12):
        ids = random_ids(6 + 3 * seed, seed=seed + 40)[0].tolist()
        ids = ids + ids[:6]  # a repeat: lookup drafters find matches
        plain = generate(model, tokenizer, ids, max_new_tokens=12).token_ids[0]
        rows = exact_head(model).rows
        result = speculator.generate(tokenizer, ids, max_new_tokens=12)
        assert result.token_ids == plain
        assert exact_head(model).rows > rows
        steps, tokens = steps + result.steps, tokens + result.new_tokens
    assert tokens / steps > 1.1  # drafts were accepted: trees were verified with the exact head


def test_likely_chain_follows_the_likeliest_child():
    """The verifier approximates these rows in one int8 call (the walk most likely visits them)."""
    candidates = CandidateTree(5)
    a = candidates.add(0, 10, 0.3, ("x", 1, 0))
    b = candidates.add(0, 11, 0.9, ("x", 1, 1))
    candidates.add(a, 12, 0.9, ("x", 2, 0))
    c = candidates.add(b, 13, 0.5, ("x", 2, 0))
    candidates.add(b, 14, 0.6, ("x", 2, 1))
    candidates.add(c, 15, 0.9, ("x", 3, 0))
    tree = candidates.subtree(candidates.ranked())
    tokens = lambda nodes: [tree.tokens[i] for i in nodes]  # noqa: E731
    assert tokens(tree.likely_chain(0, 8)) == [5, 11, 14]
    assert tokens(tree.likely_chain(0, 2)) == [5, 11]
    assert tokens(tree.likely_chain(tree.tokens.index(13), 8)) == [13, 15]
    assert DraftTree.chain(1, [2, 3, 4]).likely_chain(1, 2) == [1, 2]  # no probabilities: the first child


def test_sampling_with_the_flag_falls_back_to_the_fp32_layer():
    """Documented choice: the flag is ignored (the fp32 layer) where the token is not a plain argmax."""
    model, tokenizer = tiny_llama(), TinyTokenizer()
    ids = random_ids(12, seed=3)[0].tolist()
    rows = exact_head(model).rows
    for options in ({"temperature": 0.8, "top_k": 20, "seed": 1}, {"repetition_penalty": 1.3}):
        plain = generate(model, tokenizer, ids, max_new_tokens=10, **options).token_ids
        assert generate(model, tokenizer, ids, max_new_tokens=10, exact_int8_head=True, **options).token_ids == plain
        speculator = Speculator(model, "auto", cost=CostModel.synthetic(0.02), exact_int8_head=True)
        spec = speculator.generate(tokenizer, ids, max_new_tokens=10, **options).token_ids
        if "repetition_penalty" in options:  # greedy: speculation is exact token for token
            assert spec == plain[0]
    assert exact_head(model).rows == rows  # never used


def test_cli_flag(monkeypatch, capsys):
    import json

    model = tiny_llama()
    monkeypatch.setattr("tokensift.models.load_model", lambda *args, **kwargs: (model, TinyTokenizer()))
    outputs = []
    for extra in ([], ["--exact-int8-head"], ["--speculate", "prompt_lookup", "--tree-nodes", "4", "--no-spec-warm",
                  "--exact-int8-head"]):
        monkeypatch.setattr("sys.argv", ["tokensift", "generate", "--prompt", "5 6 7 8 5 6 7", "--max-new-tokens", "8",
                                         "--json", *extra])
        cli.main()
        outputs.append(json.loads(capsys.readouterr().out)["token_ids"])
    assert outputs[0] == outputs[1] == outputs[2]


@pytest.mark.real
def test_real_model_greedy_identical_with_the_flag():
    """SmolLM2: plain and speculative greedy with the exact int8 head == plain fp32 greedy."""
    from tokensift.models import load_model

    model, tokenizer = load_model()
    speculator = Speculator(model, "auto", cost=CostModel.synthetic(0.05), exact_int8_head=True)
    for text in ["def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n", "The capital of France is"]:
        plain = generate(model, tokenizer, text, max_new_tokens=24, stop_at_eos=False).token_ids[0]
        assert generate(model, tokenizer, text, max_new_tokens=24, stop_at_eos=False, exact_int8_head=True).token_ids[0] == plain
        assert speculator.generate(tokenizer, text, max_new_tokens=24, stop_at_eos=False).token_ids == plain
    assert exact_head(model).full_rows == 0
