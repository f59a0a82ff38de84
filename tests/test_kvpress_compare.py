"""kvpress side-by-side: ratio conventions, job/row format, scoring (no kvpress venv needed)."""

from __future__ import annotations

import ast
import json

import pytest

from tokensift.bench import kvpress_compare as kc
from tokensift.bench.tasks import build_instances, default_tokenizer
from tokensift.errors import TokensiftError


def test_keep_ratio_is_the_complement_of_kvpress_compression_ratio():
    assert kc.keep_to_compression_ratio(0.125) == 0.875
    assert kc.keep_to_compression_ratio(1.0) == 0.0
    assert kc.compression_to_keep_ratio(0.75) == 0.25
    for keep in (0.05, 0.1, 0.125, 0.25, 0.5):
        assert kc.compression_to_keep_ratio(kc.keep_to_compression_ratio(keep)) == keep


@pytest.mark.parametrize("bad", [0.0, -0.1, 1.5])
def test_bad_keep_ratio_is_a_user_error(bad):
    with pytest.raises(TokensiftError, match="keep ratio"):
        kc.keep_to_compression_ratio(bad)


def test_runs_carry_both_ratios_for_every_press_and_ratio():
    runs = kc.make_runs(["snapkv", "adakv_snapkv"], [0.125, 0.5])
    assert len(runs) == 4
    assert {"press": "snapkv", "keep_ratio": 0.125, "compression_ratio": 0.875} in runs
    with pytest.raises(TokensiftError, match="unknown kvpress press"):
        kc.make_runs(["nope"], [0.5])


def test_all_required_presses_are_known_to_the_worker():
    source = kc.WORKER.read_text()
    for press in kc.PRESSES:
        assert f'"{press}"' in source


def test_worker_does_not_import_tokensift():
    tree = ast.parse(kc.WORKER.read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
    assert "tokensift" not in imported


def test_rows_are_scored_with_the_task_scorer():
    tokenizer = default_tokenizer()
    (instance,) = build_instances("niah", tokenizer, 1024, n=1, seed=0)
    base = {"key": instance.key, "task": "niah", "press": "snapkv", "keep_ratio": 0.25,
            "compression_ratio": 0.75, "status": "ok", "kv_tokens_effective": 224.0}
    right = kc.score_row({**base, "generated_text": f" {instance.answers[0]}."}, instance)
    wrong = kc.score_row({**base, "generated_text": " 12."}, instance)
    failed = kc.score_row({**base, "status": "error", "error": "AssertionError: eager"}, instance)
    assert (right["score"], wrong["score"], failed["score"]) == (1.0, 0.0, None)
    summary = kc.summarize([right, wrong, failed])
    assert summary["snapkv@keep=0.25"]["mean_score"] == 0.5
    assert summary["snapkv@keep=0.25"]["errors"] == ["AssertionError: eager"]
    json.dumps(summary)


@pytest.mark.skipif(
    not __import__("os").environ.get("TOKENSIFT_KVPRESS_E2E"),
    reason="end to end kvpress run (builds a venv, minutes): set TOKENSIFT_KVPRESS_E2E=1",
)
def test_end_to_end_on_two_instances(tmp_path):
    from tokensift.bench.tasks import write_jsonl

    tokenizer = default_tokenizer()
    instances = build_instances("niah", tokenizer, 1024, n=1, seed=0)
    instances += build_instances("ppl", tokenizer, 1024, n=1, seed=0)
    path = write_jsonl(instances, tmp_path / "tasks.jsonl")
    rows = kc.run(path, ["full", "snapkv", "observed_attention"], [0.5], tmp_path / "rows.jsonl")
    assert len(rows) == 6
    full = next(r for r in rows if r["press"] == "full" and r["task"] == "niah")
    assert full["status"] == "ok" and full["score"] == 1.0
    snap = next(r for r in rows if r["press"] == "snapkv" and r["task"] == "niah")
    assert snap["kv_tokens_kept"] == pytest.approx(len(instances[0].context_ids) * 0.5, abs=1)


@pytest.mark.skipif(
    not __import__("os").environ.get("TOKENSIFT_KVPRESS_E2E"),
    reason="end to end kvpress run (builds a venv, minutes): set TOKENSIFT_KVPRESS_E2E=1",
)
def test_one_shared_prefill_equals_a_prefill_per_press(tmp_path):
    """Every press compressing its own copy at each layer of one prefill gives the answers and
    cache sizes of kvpress's own hook in a prefill of its own."""
    from tokensift.bench.tasks import write_jsonl

    instances = build_instances("niah", default_tokenizer(), 1024, n=1, seed=1)
    path = write_jsonl(instances, tmp_path / "tasks.jsonl")
    presses = ["snapkv", "expected_attention", "adakv_snapkv", "observed_attention", "pyramidkv", "knorm"]
    shared = kc.run(path, presses, [0.25], tmp_path / "shared.jsonl")
    separate = kc.run(path, presses, [0.25], tmp_path / "separate.jsonl", separate=True)
    assert [r["status"] for r in shared] == ["ok"] * len(presses)
    for a, b in zip(shared, separate):
        assert (a["press"], a["generated_ids"], a["kv_tokens_effective"]) == (b["press"], b["generated_ids"], b["kv_tokens_effective"])
    assert {r["prefill_shared_by"] for r in shared} == {1, len(presses) - 1}
    assert len({tuple(r["generated_ids"]) for r in shared}) > 1  # the presses really differ
