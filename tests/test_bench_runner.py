"""The benchmark runner: exact prefill replay, batched decoding, resumable cells, report."""

import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from conftest import random_ids, tiny_llama
from tokensift.bench.metrics import matching_prefix, mean_kl
from tokensift.bench.replay import merge_caches, record_prefill, replay
from tokensift.bench.runner import BenchConfig, greedy_tokens, run_bench
from tokensift.engine import make_cache
from tokensift.policies import POLICIES, build_policy



def replayable(name: str) -> bool:
    """Evict-only policies on the standard storage (others replay too, but store differently)."""
    policy = build_policy(name, budget=30, n_sink=2, window=4) if POLICIES[name].evicts else None
    return policy is not None and getattr(policy, "layer_class", None) is None and not getattr(policy, "reads_subset", False)


EVICTING = sorted(name for name in POLICIES if replayable(name))


@pytest.mark.parametrize("name", EVICTING)
def test_replay_equals_fresh_prefill(name):
    model = tiny_llama()
    ids = random_ids(90, seed=4)
    policy = build_policy(name, budget=30, n_sink=2, window=4)
    replayed = replay(model, policy, record_prefill(model, ids))
    fresh = make_cache(model, policy)
    with torch.inference_mode():
        model(ids, past_key_values=fresh, use_cache=True)
    for a, b in zip(replayed.selecting_layers, fresh.selecting_layers):
        assert torch.equal(a.positions, b.positions)
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)


def test_merged_batch_decodes_like_each_cache_alone():
    model = tiny_llama()
    recording = record_prefill(model, random_ids(80, seed=6))
    policies = [build_policy("snapkv", budget=20, n_sink=2, window=4), build_policy("knorm", budget=40, n_sink=2, window=4), build_policy("full")]
    suffix = [5, 6, 7, 8]
    merged = greedy_tokens(model, merge_caches([replay(model, p, recording) for p in policies], model), [suffix] * 3, 8)
    for policy, tokens in zip(policies, merged):
        alone = replay(model, policy, recording)
        alone.set_defer_eviction(True)  # the benchmark protocol: no eviction once the question arrives
        assert greedy_tokens(model, alone, [suffix], 8)[0] == tokens


def test_metrics():
    logits = torch.zeros(4, 10)
    logits[torch.arange(4), torch.tensor([1, 2, 3, 4])] = 5.0
    assert matching_prefix(logits, [1, 2, 9, 4]) == 0.5
    assert matching_prefix(logits, [1, 2, 3, 4]) == 1.0
    assert mean_kl(logits, logits) == pytest.approx(0.0, abs=1e-6)
    assert mean_kl(logits, torch.zeros(4, 10)) > 0


@pytest.fixture(scope="module")
def tiny_real_vocab():
    """A tiny random Llama with the embedded tokenizer's vocabulary (fast, offline)."""
    from tokensift.bench.tasks import default_tokenizer

    tokenizer = default_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=8192)
    return LlamaForCausalLM(config).eval(), tokenizer


def test_tiny_end_to_end_bench_resumes(tmp_path, tiny_real_vocab):
    model, tokenizer = tiny_real_vocab
    config = BenchConfig.for_suite(
        "quick", policies=["full", "snapkv", "h2o"], budgets=[64], lengths=[600], samples=1,
        tasks=["niah", "vt", "ppl", "fidelity", "cost"], cost_lengths=[600],
    )
    config.ppl_length = 700
    run_bench(config, tmp_path, model=model, tokenizer=tokenizer)
    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert {r["task"] for r in rows} == {"niah", "vt", "ppl", "fidelity", "cost"}
    for row in rows:
        for key in ("task", "protocol", "policy", "params", "budget", "ratio", "length", "samples", "score",
                    "versions", "machine", "seed", "library"):
            assert key in row
    assert len([r for r in rows if r["task"] == "niah"]) == 3
    assert (tmp_path / "report.md").exists() and (tmp_path / "score_vs_budget.png").exists()
    run_bench(config, tmp_path, model=model, tokenizer=tokenizer)  # resume: nothing new
    again = (tmp_path / "results.jsonl").read_text().splitlines()
    assert len(again) == len(rows)


def test_all_suffix_runs_a_policy_once_without_budget():
    from tokensift.bench.runner import BenchConfig, settings_for

    config = BenchConfig(policies=["full", "zipcache@all", "snapkv"], budgets=[64, 128])
    labels = [s.label for s in settings_for(config)]
    assert labels == ["full", "zipcache", "snapkv@64", "snapkv@128"]
    assert settings_for(config)[1].build().budget is None


def test_reading_policies_are_teacher_forced_one_token_at_a_time():
    """Blocks are read densely, so ppl/fidelity must feed readers single tokens to measure them."""
    from tokensift.bench.metrics import DECODE_CHUNK
    from tokensift.bench.runner import decode_chunk

    assert decode_chunk(build_policy("tokenselect", k=64)) == 1
    assert decode_chunk(build_policy("snapkv", budget=64)) == DECODE_CHUNK


def test_default_policies_build_distinct_policies():
    """No default setting repeats another under a different name (e.g. ``adakv(snapkv)`` is ``adakv``)."""
    from tokensift.bench.runner import default_policies

    described = [build_policy(name, budget=64).describe() for name in default_policies() if name != "full"]
    assert len(described) == len(set(described)), sorted(described)


def test_greedy_stops_once_every_row_is_settled():
    model = tiny_llama()
    ids = random_ids(40, seed=2)
    cache = replay(model, build_policy("full"), record_prefill(model, ids))
    whole = greedy_tokens(model, cache, [[5, 6]], 8)[0]
    cache = replay(model, build_policy("full"), record_prefill(model, ids))
    short = greedy_tokens(model, cache, [[5, 6]], 8, settled=lambda row, tokens: len(tokens) >= 3)[0]
    assert len(whole) == 8 and short == whole[:3]


def test_merge_groups_hold_one_size_each():
    from tokensift.bench.runner import MERGE_ROWS, Setting, merge_groups

    settings = [Setting("full")] + [Setting(p, budget=b) for b in (64, 128) for p in ("h2o", "snapkv", "tova")]
    settings += [Setting(f"p{i}", budget=256) for i in range(MERGE_ROWS + 1)]
    groups = merge_groups(settings)
    assert all(len({(s.budget, s.ratio) for s in group}) == 1 for group in groups)
    assert sorted(len(g) for g in groups) == [1, 1, 3, 3, MERGE_ROWS]
    assert sorted(map(Setting.__repr__, sum(groups, []))) == sorted(map(Setting.__repr__, settings))


def test_full_only_tasks_run_the_full_cache_alone():
    from tokensift.bench.runner import job_settings, plan_jobs, settings_for

    config = BenchConfig.for_suite("standard", policies=["full", "snapkv"])
    jobs = plan_jobs(config)
    retrieval = [job for job in jobs if job.task not in ("ppl", "fidelity")]
    kinds = ["language" if job.task in ("ppl", "fidelity") else "full only" if job.full_only else "matrix" for job in jobs]
    assert kinds == sorted(kinds, key=["matrix", "language", "full only"].index)  # heavy jobs first
    for job in retrieval:
        chosen = [s.label for s in job_settings(job, config, settings_for(config))]
        assert chosen == (["full"] if job.full_only else ["full"] + [f"snapkv@{b}" for b in config.budgets])
    named = BenchConfig.for_suite("standard", tasks=["vt"])  # naming a task runs it with every policy
    assert named.full_only_tasks == [] and not any(job.full_only for job in plan_jobs(named))


def test_workers_give_the_same_rows_as_one_process(tmp_path, tiny_real_vocab):
    model, tokenizer = tiny_real_vocab
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    config = BenchConfig.for_suite(
        "quick", policies=["full", "snapkv", "tova"], budgets=[64], lengths=[600], samples=2,
        tasks=["niah", "vt", "fidelity"], model=str(tmp_path / "model"),
    )
    run_bench(config, tmp_path / "one", model=model, tokenizer=tokenizer)
    run_bench(config, tmp_path / "two", workers=2)

    def scores(folder):
        rows = [json.loads(line) for line in (folder / "results.jsonl").read_text().splitlines()]
        return {row["cell"]: (row["sample_scores"], row.get("sample_kl"), row.get("kv_bytes")) for row in rows}

    assert scores(tmp_path / "two") == scores(tmp_path / "one")
    assert len(scores(tmp_path / "one")) == 9


@pytest.mark.parametrize("policy", ["full", "snapkv", "tokenselect", "hisa"])
def test_prompts_batched_with_uneven_suffixes_decode_like_each_alone(policy):
    """The runner prefills several prompts together and pads their questions to one length."""
    model = tiny_llama()
    contexts = [random_ids(70, seed=seed)[0].tolist() for seed in (11, 12, 13)]
    suffixes = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14]]
    build = lambda: build_policy(policy) if policy == "full" else build_policy(policy, budget=24, n_sink=2, window=4)  # noqa: E731
    batched = replay(model, build(), record_prefill(model, torch.tensor(contexts)))
    batched.set_defer_eviction(True)
    together = greedy_tokens(model, batched, suffixes, 8)
    for context, suffix, tokens in zip(contexts, suffixes, together):
        alone = replay(model, build(), record_prefill(model, torch.tensor([context])))
        alone.set_defer_eviction(True)
        assert greedy_tokens(model, alone, [suffix], 8)[0] == tokens


def test_merge_groups_bound_the_cached_tokens():
    from tokensift.bench.runner import MERGE_TOKENS, Setting, merge_groups

    settings = [Setting(f"p{i}", budget=1024) for i in range(10)] + [Setting("full")]
    groups = merge_groups(settings, rows_per_setting=4, length=4000)
    assert all(len(g) * 4 * 1024 <= MERGE_TOKENS for g in groups if g[0].budget)
    assert [len(g) for g in groups if g[0].policy == "full"] == [1]


def test_prompts_sharing_a_batch_score_like_one_at_a_time(tmp_path, tiny_real_vocab, monkeypatch):
    import tokensift.bench.runs as runner

    from tokensift.bench.tasks import get_task

    model, tokenizer = tiny_real_vocab
    # a score that tells every generated text and prompt apart (the random model never finds the needle)
    monkeypatch.setattr(get_task("niah"), "score", lambda instance, text: sum(map(ord, text)) % 997 + instance.index / 10)
    config = BenchConfig.for_suite("quick", policies=["full", "snapkv", "knorm", "streaming_llm", "tokenselect"],
                                   budgets=[64], lengths=[600], samples=3, tasks=["niah"])
    rows = {}
    for batch in (1, 2):
        monkeypatch.setattr(runner, "PROMPT_BATCH", batch)
        run_bench(config, tmp_path / str(batch), model=model, tokenizer=tokenizer)
        lines = (tmp_path / str(batch) / "results.jsonl").read_text().splitlines()
        rows[batch] = {r["cell"]: (r["sample_scores"], r["kv_tokens"]) for r in map(json.loads, lines)}
    assert rows[1] == rows[2] and len(rows[1]) == 5
    assert len({tuple(scores) for scores, _ in rows[1].values()}) == 5  # the settings really differ
