"""Mixed sliding/full layers (Gemma 3 shape): banded prefill, budgets, byte counts, replay."""

import pytest
import torch
from transformers import Gemma3ForCausalLM, Gemma3TextConfig

from tokensift import banded
from tokensift.bench.replay import record_prefill, replay
from tokensift.cache import SelectingLayer, WindowLayer
from tokensift.engine import make_cache
from tokensift.policies import build_policy
from tokensift.policies.pyramidkv import pyramid_budgets

WINDOW = 8
LAYER_TYPES = ["sliding_attention", "full_attention", "sliding_attention", "sliding_attention", "full_attention"]


def gemma3_mixed(seed: int = 0) -> Gemma3ForCausalLM:
    """A tiny random Gemma 3: 5 layers, 3 sliding (window 8) around 2 full-attention layers, 1 KV head."""
    torch.manual_seed(seed)
    config = Gemma3TextConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=len(LAYER_TYPES),
        num_attention_heads=4, num_key_value_heads=1, head_dim=16, max_position_embeddings=1024,
        sliding_window=WINDOW, layer_types=LAYER_TYPES,
    )
    return Gemma3ForCausalLM(config).eval()


def ids_of(length: int, seed: int = 0, batch: int = 1) -> torch.Tensor:
    return torch.randint(1, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def small_blocks(monkeypatch):
    """Banded blocks of 16 queries, counting banded calls."""
    monkeypatch.setattr(banded, "CHUNK", 16)
    calls = []
    original = banded.banded_attention

    def counted(*args, **kwargs):
        calls.append(args[1].shape[2])
        return original(*args, **kwargs)

    monkeypatch.setattr("tokensift.attention.banded_attention", counted)
    return calls


@torch.inference_mode()
def logits_of(model, ids, mask=None, enabled=True):
    previous = banded.ENABLED[0]
    banded.ENABLED[0] = enabled
    try:
        cache = make_cache(model, build_policy("full"))
        return model(input_ids=ids, attention_mask=mask, past_key_values=cache, use_cache=True).logits
    finally:
        banded.ENABLED[0] = previous


def test_banded_prefill_equals_the_stock_path(small_blocks):
    model = gemma3_mixed()
    ids = ids_of(100, seed=1)
    stock = logits_of(model, ids, enabled=False)
    assert not small_blocks
    fast = logits_of(model, ids)
    assert small_blocks and len(small_blocks) == LAYER_TYPES.count("sliding_attention")  # every sliding layer, once
    torch.testing.assert_close(fast, stock, rtol=1e-5, atol=1e-5)


def test_banded_prefill_with_left_padding_and_over_a_cache(small_blocks):
    model = gemma3_mixed(seed=2)
    ids = ids_of(90, seed=3, batch=2)
    mask = torch.ones_like(ids)
    mask[1, :13] = 0  # left padding
    stock, fast = logits_of(model, ids, mask, enabled=False), logits_of(model, ids, mask)
    torch.testing.assert_close(fast[1, 13:], stock[1, 13:], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fast[0], stock[0], rtol=1e-5, atol=1e-5)
    # a second long block over a filled cache (chunked prefill): past keys are in the band too
    with torch.inference_mode():
        results = []
        for enabled in (False, True):
            banded.ENABLED[0] = enabled
            cache = make_cache(model, build_policy("full"))
            model(input_ids=ids[:1, :40], past_key_values=cache, use_cache=True)
            results.append(model(input_ids=ids[:1, 40:], past_key_values=cache, use_cache=True).logits)
        banded.ENABLED[0] = True
    torch.testing.assert_close(results[1], results[0], rtol=1e-5, atol=1e-5)


def test_short_prefills_and_decode_steps_keep_the_stock_path(small_blocks):
    model = gemma3_mixed()
    logits_of(model, ids_of(16 + WINDOW, seed=1))  # not longer than one block plus the window
    assert not small_blocks


def expected_bytes(layer_tokens: list[int], heads: int = 1, dim: int = 16) -> int:
    return sum(2 * heads * tokens * dim * 4 for tokens in layer_tokens)


def test_sliding_layers_hold_their_window_and_kv_bytes_count_every_layer():
    model = gemma3_mixed()
    n, budget = 100, 20
    cache = make_cache(model, build_policy("snapkv", budget=budget, n_sink=2, window=4))
    with torch.inference_mode():
        model(input_ids=ids_of(n), past_key_values=cache, use_cache=True)
    sliding = [layer for layer in cache.layers if not isinstance(layer, SelectingLayer)]
    assert len(sliding) == 3 and all(isinstance(layer, WindowLayer) for layer in sliding)
    for layer in sliding:  # the window's tokens, and only their memory (no view of the whole prompt)
        assert layer.keys.shape[-2] == WINDOW - 1
        assert layer.keys.untyped_storage().nbytes() == layer.keys.nbytes
    kept = [layer.kept for layer in cache.selecting_layers]
    assert kept == [budget, budget]  # the policy acts on the full-attention layers only
    assert cache.kv_bytes == expected_bytes([WINDOW - 1] * 3 + kept)
    assert cache.kv_bytes_full == expected_bytes([WINDOW - 1] * 3 + [n, n])


def test_budget_schedules_span_the_selecting_layers_only():
    model = gemma3_mixed()
    cache = make_cache(model, build_policy("pyramidkv", budget=30, n_sink=2, window=4))
    assert [layer.layer_idx for layer in cache.selecting_layers] == [1, 4]
    assert [(layer.depth, layer.depths) for layer in cache.selecting_layers] == [(0, 2), (1, 2)]
    with torch.inference_mode():
        model(input_ids=ids_of(120, seed=5), past_key_values=cache, use_cache=True)
    kept = [layer.kept for layer in cache.selecting_layers]
    assert kept == pyramid_budgets(30, 2, cache.policy.beta, cache.policy.protected + 1)
    assert sum(kept) == 60  # same total as 30 per selecting layer


def test_decode_keeps_sliding_layers_at_their_window():
    model = gemma3_mixed()
    cache = make_cache(model, build_policy("full"))
    with torch.inference_mode():
        model(input_ids=ids_of(60), past_key_values=cache, use_cache=True)
        for step in range(5):
            model(input_ids=ids_of(1, seed=step), past_key_values=cache, use_cache=True)
    for layer in cache.layers:
        if not isinstance(layer, SelectingLayer):
            assert layer.keys.shape[-2] == WINDOW - 1 and layer.keys.untyped_storage().nbytes() <= WINDOW * 16 * 4
    assert cache.get_seq_length() == 65


@pytest.mark.parametrize("name", ["snapkv", "h2o", "knorm", "streaming_llm"])
def test_replay_equals_fresh_prefill_on_mixed_layers(name):
    model = gemma3_mixed()
    ids = ids_of(90, seed=4)
    policy = build_policy(name, budget=24, n_sink=2, window=4)
    replayed = replay(model, policy, record_prefill(model, ids))
    fresh = make_cache(model, policy)
    with torch.inference_mode():
        model(ids, past_key_values=fresh, use_cache=True)
    for a, b in zip(replayed.layers, fresh.layers):
        assert type(a) is type(b)
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
    assert replayed.kv_bytes == fresh.kv_bytes


def test_cross_layer_reading_selects_on_a_full_attention_layer():
    """TidalDecode's selection layers count selecting layers (layer 0 of Gemma 3 slides)."""
    model = gemma3_mixed()
    cache = make_cache(model, build_policy("tidaldecode", k=8, n_sink=2, window=2, full_layers=0, reselect_layer=-1))
    with torch.inference_mode():
        model(input_ids=ids_of(80), past_key_values=cache, use_cache=True)
        model(input_ids=ids_of(1, seed=9), past_key_values=cache, use_cache=True)
    assert cache.policy.shared_key in cache.shared  # the first full-attention layer chose the positions


# ------------------------------------------------------------------ the long suite and its task
def test_long_suite_runs_gemma3_at_three_lengths():
    from tokensift.bench.runner import BenchConfig, environment

    config = BenchConfig.for_suite("long")
    assert config.model == "gemma3" and config.lengths == [8192, 16384, 32768] and len(config.budgets) == 4
    assert "essay_qa" in config.tasks and config.full_gate == 0.3
    assert config.samples_at(8192) == 8 and config.samples_at(32768) == 4
    assert environment(config)["model"] == "gemma3"
    assert environment(BenchConfig.for_suite("quick"))["model"] == "smollm2"


def test_essay_qa_quotes_the_context_and_scores_the_next_words():
    from tokensift.bench.tasks import build_instances, default_tokenizer, score

    tokenizer = default_tokenizer()
    for instance in build_instances("essay_qa", tokenizer, 1024, n=3, seed=1):
        context, suffix = tokenizer.decode(instance.context_ids), tokenizer.decode(instance.suffix_ids)
        quote, (answer,) = instance.meta["quote"], instance.answers
        assert context.count(f"{quote} {answer}") == 1 and suffix.rstrip().endswith(quote)
        assert len(instance.context_ids) == 1024 - 128
        assert score(instance, f" {answer} and more") == 1.0 and score(instance, " something else") == 0.0


def test_gated_policies_run_only_where_the_full_cache_scores(tmp_path, monkeypatch):
    """The long suite's gate: a task whose full cache scores below the gate gets the full row only."""
    import json

    from tokensift.bench import runs as runner
    from tokensift.bench.runs import BenchConfig, Results, RunContext, Setting, run_gated

    calls = []

    def fake_retrieval(context, job, settings, recordings=None):
        task, protocol, length, results = job.task, job.protocol, job.length, context.results
        calls.append([s.label for s in settings])
        for s in results.pending(task, protocol, length, settings):
            results.write({"cell": runner.cell_key(task, protocol, length, s), "score": 0.1 if task == "vt" else 0.9})

    monkeypatch.setattr(runner, "run_retrieval", fake_retrieval)
    config = BenchConfig(suite="long", samples=2, full_gate=0.3)
    results = Results(tmp_path / "results.jsonl")
    settings = [Setting("full"), Setting("snapkv", budget=64)]
    for task in ("vt", "niah"):
        run_gated(RunContext(None, None, config, results, lambda n: None), runner.Job(task, 1024), settings)
    cells = [json.loads(line)["cell"] for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert [c for c in cells if c.startswith("vt")] == ["vt|query_agnostic|1024|full"]
    assert "niah|query_agnostic|1024|snapkv@64" in cells


@pytest.mark.parametrize("name", ["full", "snapkv"])
def test_replayed_and_merged_caches_decode_like_a_fresh_prefill(name):
    """Sliding-window layers rebuilt from the recording know how many tokens they have seen."""
    from tokensift.bench.replay import merge_caches
    from tokensift.bench.runner import greedy_tokens

    model = gemma3_mixed()
    ids = ids_of(70, seed=8)
    policy = build_policy(name) if name == "full" else build_policy(name, budget=24, n_sink=2, window=4)
    recording = record_prefill(model, ids)
    fresh = make_cache(model, policy)
    with torch.inference_mode():
        model(ids, past_key_values=fresh, use_cache=True)
    fresh.set_defer_eviction(True)
    suffix = [5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15]  # longer than the window
    expected = greedy_tokens(model, fresh, [suffix], 12)[0]
    replayed = replay(model, policy, recording)
    assert replayed.get_seq_length() == 70
    replayed.set_defer_eviction(True)
    assert greedy_tokens(model, replayed, [suffix], 12)[0] == expected
    merged = merge_caches([replay(model, policy, recording), replay(model, build_policy("full"), recording)], model)
    assert greedy_tokens(model, merged, [suffix, suffix], 12)[0] == expected


def test_cli_bench_passes_the_model_to_every_language_model_suite(monkeypatch, capsys):
    from conftest import run_bench_cli

    seen = {}
    monkeypatch.setattr("tokensift.bench.runner.run_bench", lambda config, out, workers=1, ray=None: seen.setdefault("config", config))
    monkeypatch.setattr("tokensift.bench.sparse_speed.run_sparse_speed", lambda out, **kw: seen.setdefault("sparse", kw))

    def run(*args):
        return run_bench_cli(monkeypatch, *args)

    assert run("--suite", "long", "--lengths", "8192") == 0
    assert seen["config"].model == "gemma3" and seen["config"].lengths == [8192]
    seen.clear()
    assert run("--suite", "quick", "--model", "gemma3") == 0 and seen["config"].model == "gemma3"
    assert run("--suite", "sparse-speed", "--model", "gemma3", "--lengths", "16384") == 0
    assert seen["sparse"] == {"model": "gemma3", "lengths": [16384], "device": "cpu", "dtype": "float32"}
    assert run("--suite", "vision", "--model", "gemma3") == 2
    assert "not a language model" in capsys.readouterr().err
