"""Vision bench report writing (fast, synthetic rows) and argument checks."""

import json

import pytest

from tokensift.bench.vision_suite import run_vision_suite, write_report
from tokensift.errors import TokensiftError


def _rows():
    full = {"setting": "full", "method": "full", "keep_ratio": 1.0, "tokens_kept": 256, "digits_linear_cls": 0.9,
            "digits_knn_cls": 0.6, "digits_knn_pooled": 0.6, "digits_linear_pooled": 0.85,
            "photo_cls_cosine": 1.0, "photo_pooled_cosine": 1.0, "images_per_s": 10.0, "latency_ms": 100.0,
            "images_per_s_full": 10.0, "latency_ms_full": 100.0, "speedup": 1.0}
    rows = [full]
    for method in ["uniform", "tome"]:
        for ratio, k in [(0.5, 128), (0.05, 13)]:
            rows.append({**full, "setting": "in_vit", "method": method, "keep_ratio": ratio, "tokens_kept": k,
                         "speedup": 1 / ratio ** 0.5})
            rows.append({"setting": "output", "method": method, "keep_ratio": ratio, "tokens_kept": k,
                         "digits_linear_pooled": 0.8, "digits_knn_pooled": 0.5, "photo_pooled_cosine": 0.9})
    return rows


def test_report_and_plots(tmp_path):
    write_report(_rows(), tmp_path, {"torch_threads": 2, "n_digits": 100, "n_photos": 18, "seed": 0, "layer": 3})
    report = (tmp_path / "report.md").read_text()
    assert "| tome | 0.05 | 13 |" in report and "| full | 1.00 | 256 |" in report
    for name in ["accuracy_vs_tokens.png", "fidelity_vs_tokens.png", "speed_vs_tokens.png"]:
        assert (tmp_path / name).stat().st_size > 1000


def test_unknown_method_fails_before_loading(tmp_path):
    with pytest.raises(TokensiftError, match="unknown visual selector"):
        run_vision_suite(tmp_path, methods=["nope"])
    assert not (tmp_path / "results.jsonl").exists()
    json.dumps(_rows())


def test_merge_shards(tmp_path):
    from tokensift.bench.vision_suite import merge_shards

    meta = {"seed": 0, "quick": False, "layer": 3, "n_digits": 100, "n_photos": 18, "torch_threads": 1}
    rows = _rows()
    for i, method in enumerate(["uniform", "tome"]):
        shard = tmp_path / f"s{i}"
        shard.mkdir()
        mine = [rows[0]] + [r for r in rows if r["method"] == method]
        (shard / "results.jsonl").write_text("".join(json.dumps({**r, **meta}) + "\n" for r in mine))
    merge_shards(tmp_path / "out", [tmp_path / "s0", tmp_path / "s1"])
    merged = [json.loads(line) for line in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
    assert [r["setting"] for r in merged].count("full") == 1 and len(merged) == len(rows)
    assert "2 concurrent processes" in (tmp_path / "out" / "report.md").read_text()
