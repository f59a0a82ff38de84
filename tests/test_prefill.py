"""Prefill policies (time to first token): exactness of the no-op schedules, true positions of the
kept tokens, composition with every KV policy and with speculation, one-line errors."""

import pytest
import torch
from transformers import DynamicCache

from conftest import TinyTokenizer, random_ids, tiny_gemma3, tiny_llama, tiny_qwen2
from tokensift import cli
from tokensift.engine import make_cache
from tokensift.errors import TokensiftError
from tokensift.generate import Decoder, generate
from tokensift.policies import POLICIES, build_policy
from tokensift.prefill import PREFILLS, build_prefill
from tokensift.prefill.gemfilter import filter_layer
from tokensift.prefill.subset import last_token_attention, subset_masks
from tokensift.speculative import CostModel, Speculator

MODELS = {"llama": tiny_llama, "qwen2": tiny_qwen2, "gemma3": tiny_gemma3}
KEEP_ALL = {
    "lazyllm": dict(layers=(1,), keep=(1.0,)),  # the stage keeps every token: runs the hooks
    "gemfilter": dict(layer=1, top_k=4096),  # keeps every token
}
PRUNING = {
    "lazyllm": dict(layers=(1, 2), keep=(0.5, 0.25)),
    "gemfilter": dict(layer=1, top_k=30),
}
COMPOSING = {**{name: (name, params) for name, params in PRUNING.items()},
             "gemfilter-compact": ("gemfilter", dict(layer=1, top_k=30, span=2, positions="compact"))}


@pytest.fixture(autouse=True)
def private_cache_dir(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("TOKENSIFT_CACHE", str(tmp_path_factory.getbasetemp() / "tokensift-cache"))


def prefill_logits(model, ids, prefill=None, policy="full"):
    cache = make_cache(model, build_policy(policy))
    decoder = Decoder(model, cache)
    with torch.inference_mode():
        if prefill is None:
            return decoder.prefill(ids, torch.ones_like(ids), None), cache
        return decoder.prefill_pruned(build_prefill(prefill[0], **prefill[1]), ids), cache


# ------------------------------------------------------------------ exactness
@pytest.mark.parametrize("arch", MODELS)
@pytest.mark.parametrize("name", KEEP_ALL)
def test_schedule_keeping_every_token_equals_full(arch, name):
    model, ids = MODELS[arch](), random_ids(60, seed=3)
    reference, _ = prefill_logits(model, ids)
    logits, cache = prefill_logits(model, ids, (name, KEEP_ALL[name]))
    assert torch.equal(logits, reference)
    assert cache.get_seq_length() == 60
    prompt = ids[0].tolist()
    plain = generate(model, TinyTokenizer(), prompt, max_new_tokens=12)
    kept = generate(model, TinyTokenizer(), prompt, max_new_tokens=12, prefill=build_prefill(name, **KEEP_ALL[name]))
    assert kept.token_ids == plain.token_ids
    assert kept.prefill == name


def test_full_prefill_is_the_plain_prefill():
    model, ids = tiny_llama(), random_ids(50, seed=1)
    reference, _ = prefill_logits(model, ids)
    logits, _ = prefill_logits(model, ids, ("full", {}))
    assert torch.equal(logits, reference)
    assert not build_prefill("full").prunes


# ------------------------------------------------------------- true positions
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_lazyllm_keeps_true_positions(arch):
    """Layers before the first stage equal the full prefill; at the stage the kept tokens' keys are
    the full prefill's keys at their true positions (same hidden states, RoPE at the true position)."""
    model, ids = MODELS[arch](), random_ids(80, seed=2)
    _, full = prefill_logits(model, ids)
    _, pruned = prefill_logits(model, ids, ("lazyllm", dict(layers=(1,), keep=(0.3,))))
    first, second = pruned.layers[0], pruned.layers[1]
    assert torch.equal(first.keys, full.layers[0].keys) and not first.compressed
    kept = second.positions[0, 0]
    assert second.kept == 24 and second.compressed and int(kept[-1]) == 79
    assert torch.equal(kept, torch.sort(kept).values)
    torch.testing.assert_close(second.keys, full.layers[1].keys[:, :, kept], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(second.values, full.layers[1].values[:, :, kept], rtol=1e-5, atol=1e-5)
    assert all(layer.seen == 80 and int(layer.valid_seen[0]) == 80 for layer in pruned.layers)
    assert torch.equal(second.ranks[0, 0], kept) and torch.equal(second.sink[0, 0], kept < 4)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_gemfilter_equals_the_model_on_its_tokens_at_true_positions(arch):
    """The kept tokens run through the stock model with their true position ids; decoding goes on
    at position n, n+1, ... exactly as a plain cache of those tokens would."""
    model, ids = MODELS[arch](), random_ids(90, seed=4)
    logits, cache = prefill_logits(model, ids, ("gemfilter", dict(layer=1, top_k=25)))
    kept = cache.layers[0].positions[0, 0]
    assert kept.numel() == 25 and int(kept[-1]) == 89
    with torch.inference_mode():
        plain = DynamicCache(config=model.config)
        out = model(input_ids=ids[:, kept], position_ids=kept[None], past_key_values=plain, use_cache=True)
        torch.testing.assert_close(logits, out.logits[:, -1].float(), rtol=1e-5, atol=1e-5)
        decoder, expected, got = Decoder(model, cache), [], []
        decoder.mask = torch.ones(1, 90, dtype=torch.long)
        token, reference = logits.argmax(-1), out.logits[:, -1].argmax(-1)
        for step in range(8):
            got.append(int(token)), expected.append(int(reference))
            token = decoder.forward(token[:, None], torch.ones(1, 1, dtype=torch.long)).argmax(-1)
            step_out = model(input_ids=reference[:, None], position_ids=torch.tensor([[90 + step]]),
                             past_key_values=plain, use_cache=True)
            reference = step_out.logits[:, -1].argmax(-1)
    assert got == expected


@pytest.mark.parametrize("arch", MODELS)
def test_compact_gemfilter_is_the_model_on_its_tokens_reindexed(arch):
    """positions=compact (the paper's re-indexing): the cache holds exactly what a plain prefill of
    the kept tokens as a fresh prompt holds, and greedy decoding goes on at position top_k."""
    model, ids = MODELS[arch](), random_ids(90, seed=4)
    settings = dict(layer=1, top_k=40, span=2, positions="compact")
    logits, cache = prefill_logits(model, ids, ("gemfilter", settings))
    kept = build_prefill("gemfilter", **settings).select(model, ids, filter_layer(model, 1))
    assert cache.get_seq_length() == 40 and kept.numel() == 40
    reference, plain_cache = prefill_logits(model, ids[:, kept])
    assert torch.equal(logits, reference)
    prompt, tokenizer = ids[0].tolist(), TinyTokenizer()
    compact = generate(model, tokenizer, prompt, max_new_tokens=10, prefill=build_prefill("gemfilter", **settings))
    plain = generate(model, tokenizer, ids[0, kept].tolist(), max_new_tokens=10)
    assert compact.token_ids == plain.token_ids


def test_span_keeps_the_neighbours_of_the_best_tokens():
    from tokensift.prefill.subset import top_tokens

    scores = torch.zeros(40)
    scores[10], scores[25] = 5.0, 4.0
    spans = top_tokens(scores, 13, protect=3, span=2).tolist()
    assert spans == [8, 9, 10, 11, 12, 23, 24, 25, 26, 27, 37, 38, 39]
    assert top_tokens(scores, 6, protect=3, span=2).tolist() == [9, 10, 11, 37, 38, 39]  # nearest first, exact count
    assert top_tokens(scores, 40, protect=3, span=2).tolist() == list(range(40))


def test_gemma3_keeps_the_window_and_counts_true_distance():
    model, ids = tiny_gemma3(), random_ids(100, seed=5)
    window = model.config.sliding_window
    for name, params in PRUNING.items():
        _, cache = prefill_logits(model, ids, (name, params))
        last = cache.selecting_layers[-1].positions[0, 0]
        assert set(range(100 - window, 100)) <= set(last.tolist()) and last.numel() < 100
        assert all(layer.get_seq_length() == 100 for layer in cache.layers)
    positions = torch.tensor([0, 10, 50, 60, 99])
    sliding = subset_masks(model, positions)["sliding_attention"][0, 0]
    assert sliding[3, 2] and not sliding[2, 1] and not sliding[4, 2] and not sliding[0, 1]  # true distances, causal


def test_last_token_attention_is_the_softmax_row():
    torch.manual_seed(0)
    query, key = torch.randn(1, 4, 6, 8), torch.randn(1, 2, 6, 8)
    expected = torch.softmax(query[:, :, -1:] @ key.repeat_interleave(2, dim=1).transpose(-1, -2) * 0.3, -1)
    torch.testing.assert_close(last_token_attention(query, key, 0.3), expected.mean(dim=(1, 2)))
    two = last_token_attention(query, key, 0.3, rows=2)
    assert two.shape == (1, 6) and float(two.sum()) == pytest.approx(1.0, abs=1e-5)


# ------------------------------------------------------------------ composition
def every_policy():
    for name in sorted(POLICIES):
        if name == "full":
            yield build_policy("full")
            continue
        try:
            yield build_policy(name, budget=24, n_sink=2, window=4)
        except TokensiftError as error:
            if "needs k=" not in str(error) and "k=" not in str(error):
                raise
            yield build_policy(name, budget=24, n_sink=2, window=4, k=8)


@pytest.mark.parametrize("label", COMPOSING)
def test_composes_with_every_kv_policy(label):
    name, params = COMPOSING[label]
    model, prompt = tiny_llama(), random_ids(70, seed=6)[0].tolist()
    prefill = build_prefill(name, **params)
    for policy in every_policy():
        if policy.name == "tiered":
            with pytest.raises(TokensiftError, match="does not compose"):
                generate(model, TinyTokenizer(), prompt, policy=policy, max_new_tokens=4, prefill=prefill)
            continue
        result = generate(model, TinyTokenizer(), prompt, policy=policy, max_new_tokens=6, prefill=prefill,
                          question=[5, 6, 7])
        assert result.new_tokens == 6 and result.prefill == name, policy.name
        assert result.kv_tokens < 73, policy.name  # nothing pruned came back


@pytest.mark.parametrize("label", COMPOSING)
def test_speculation_is_lossless_over_a_pruned_prefill(label):
    """Speculative greedy output equals plain greedy decoding of the same pruned cache (a KV policy
    that evicts nothing more: eviction times differ between the two loops)."""
    name, params = COMPOSING[label]
    model, ids = tiny_llama(), random_ids(70, seed=7)[0].tolist()
    prefill = build_prefill(name, **params)
    policy = build_policy("snapkv", budget=400, n_sink=2, window=4)
    spec = Speculator(model, "auto", cost=CostModel.synthetic(0.02)).generate(
        TinyTokenizer(), ids, policy=policy, max_new_tokens=20, prefill=prefill, stop_at_eos=False)
    cache = make_cache(model, build_policy("snapkv", budget=400, n_sink=2, window=4))
    decoder, tokens = Decoder(model, cache), []
    with torch.inference_mode():
        decoder.prefill_pruned(prefill, torch.tensor([ids[:-1]]))
        token = torch.tensor([ids[-1]])
        for _ in range(20):
            token = decoder.forward(token[:, None], torch.ones(1, 1, dtype=torch.long)).argmax(-1)
            tokens.append(int(token))
    assert spec.token_ids == tokens


# ---------------------------------------------------------------------- errors
@pytest.mark.parametrize("name, params, fragment", [
    ("lazyllm", dict(keep="0"), "in (0, 1]"),
    ("lazyllm", dict(layers="0.5", keep="1.5"), "in (0, 1]"),
    ("lazyllm", dict(layers="0.2,0.6", keep="0.2,0.5"), "must not increase"),
    ("lazyllm", dict(layers="0.5", keep="0.5,0.2"), "one keep fraction per pruning layer"),
    ("lazyllm", dict(speed="fast"), "has no parameter 'speed'"),
    ("gemfilter", dict(top_k="0"), "prunes every prompt token"),
    ("gemfilter", dict(top_k="many"), "must be int"),
    ("gemfilter", dict(span="-1"), "span must be >= 0"),
    ("gemfilter", dict(positions="shifted"), "positions must be 'true' or 'compact'"),
    ("nope", {}, "unknown prefill 'nope'"),
])
def test_bad_parameters_are_one_line_errors(name, params, fragment):
    with pytest.raises(TokensiftError, match=fragment.replace("(", r"\(").replace(")", r"\)").replace("]", r"\]")) as error:
        build_prefill(name, **params)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("params", [dict(layers=(0,), keep=(0.5,)), dict(layers=(3,), keep=(0.5,)),
                                    dict(layers=(2, 1), keep=(0.5, 0.5))])
def test_layers_outside_the_model_are_errors(params):
    with pytest.raises(TokensiftError, match="layer"):
        generate(tiny_llama(), TinyTokenizer(), list(range(1, 40)), max_new_tokens=2, prefill=build_prefill("lazyllm", **params))


def test_prompt_limits_batches_and_chunks_are_errors():
    model, tokenizer = tiny_llama(), TinyTokenizer()
    lazy = build_prefill("lazyllm")
    with pytest.raises(TokensiftError, match="exceeds the model's context of 1024"):
        generate(model, tokenizer, [5] * 1020, max_new_tokens=10, prefill=lazy)
    with pytest.raises(TokensiftError, match="one prompt at a time"):
        generate(model, tokenizer, [[5, 6, 7], [8, 9, 10]], max_new_tokens=2, prefill=lazy)
    with pytest.raises(TokensiftError, match="one prompt at a time"):
        generate(model, tokenizer, [5] * 50, max_new_tokens=2, prefill=lazy, prefill_chunk=16)


@pytest.mark.parametrize("args, fragment", [
    (["--prefill", "nope"], "unknown prefill 'nope'"),
    (["--prefill", "lazyllm", "--prefill-set", "keep=2"], "in (0, 1]"),
    (["--prefill", "gemfilter", "--prefill-set", "top_k=0"], "prunes every prompt token"),
])
def test_cli_errors_are_one_line(monkeypatch, capsys, args, fragment):
    monkeypatch.setattr("sys.argv", ["tokensift", "generate", "--prompt", "hi", *args])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and fragment in err and len(err.strip().splitlines()) == 1


def test_registry_lists_the_papers():
    assert {"full", "lazyllm", "gemfilter"} <= set(PREFILLS)
    assert "2407.14057" in PREFILLS["lazyllm"].paper and "2409.17422" in PREFILLS["gemfilter"].paper


# ------------------------------------------------------------------ ttft suite
def test_ttft_suite_expressions_rows_and_report(tmp_path):
    import json

    from tokensift.bench.ttft_suite import parse_prefill, rows_of, write_report

    tuned = parse_prefill("gemfilter(layer=0.7,rows=16)")
    assert (tuned.layer, tuned.rows, tuned.top_k) == (0.7, 16, 1024)
    assert parse_prefill("lazyllm(layers=0.3;0.6,keep=0.5;0.25)").keep == (0.5, 0.25)
    with pytest.raises(TokensiftError, match="key=value"):
        parse_prefill("lazyllm(fast)")
    built = {"full": parse_prefill("full"), "lazyllm": parse_prefill("lazyllm")}
    record = {"full": {"scores": [1.0, 0.0], "ttft": [10.0, 12.0], "prefill": [9.9, 11.9], "kept": [100, 100]},
              "lazyllm": {"scores": [1.0, 1.0], "ttft": [5.0, 3.0], "prefill": [4.9, 2.9], "kept": [40, 40]}}
    rows = rows_of(record, built, "niah", "query_aware", 4096, {"model": "tiny"})
    lazy = next(r for r in rows if r["prefill"] == "lazyllm")
    assert lazy["speedup_vs_full"] == pytest.approx((2.0 * 4.0) ** 0.5) and lazy["score"] == 1.0
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    write_report(tmp_path)
    report = (tmp_path / "report.md").read_text()
    assert "| niah | lazyllm | 1.00 | +50 |" in report and "2.83x" in report
