"""Benchmark task generators and scorers: determinism, exact lengths, needles, scoring."""

from __future__ import annotations

import pytest

from tokensift.bench.tasks import (
    ANSWER_ROOM, QUERY_AGNOSTIC, QUERY_AWARE, RETRIEVAL_TASKS, TaskInstance, build_instances,
    default_tokenizer, list_tasks, read_jsonl, score, write_jsonl,
)
from tokensift.bench.tasks.needles import needle_text
from tokensift.bench.tasks.vt import chain_statements
from tokensift.errors import TokensiftError


@pytest.fixture(scope="module")
def tokenizer():
    return default_tokenizer()


def decode(tokenizer, ids):
    return tokenizer.decode(ids)


def needles_of(instance: TaskInstance) -> list[str]:
    """The needle sentences an instance hides, rebuilt from its metadata."""
    meta = instance.meta
    if instance.task == "niah":
        return [needle_text(meta["key"], instance.answers[0])]
    if instance.task == "niah_multikey":
        pairs = {meta["key"]: instance.answers[0], **meta["distractors"]}
        return [needle_text(k, v) for k, v in pairs.items()]
    if instance.task == "niah_multivalue":
        return [needle_text(meta["key"], v, one_of=True) for v in instance.answers]
    if instance.task == "niah_multiquery":
        return [needle_text(k, v) for k, v in zip(meta["keys"], instance.answers)]
    if instance.task == "vt":
        return chain_statements(instance.answers, meta["value"])
    return []


def test_registry_lists_all_tasks():
    assert set(list_tasks()) == set(RETRIEVAL_TASKS) | {"ppl", "fidelity"}


@pytest.mark.parametrize("task", list_tasks())
def test_same_seed_same_ids(tokenizer, task):
    first = build_instances(task, tokenizer, 1024, n=2, seed=3)
    again = build_instances(task, tokenizer, 1024, n=2, seed=3)
    assert [i.to_json() for i in first] == [i.to_json() for i in again]


@pytest.mark.parametrize("task", list_tasks())
def test_distinct_seeds_and_indices_differ(tokenizer, task):
    a0, a1 = build_instances(task, tokenizer, 1024, n=2, seed=0)
    (b0,) = build_instances(task, tokenizer, 1024, n=1, seed=1)
    assert a0.context_ids != b0.context_ids
    assert a0.context_ids != a1.context_ids


@pytest.mark.parametrize("length", [1024, 2048, 4096, 8192])
@pytest.mark.parametrize("task", RETRIEVAL_TASKS)
@pytest.mark.parametrize("protocol", [QUERY_AGNOSTIC, QUERY_AWARE])
def test_exact_context_length(tokenizer, task, length, protocol):
    (instance,) = build_instances(task, tokenizer, length, n=1, seed=0, protocol=protocol)
    assert len(instance.context_ids) == length - ANSWER_ROOM
    assert instance.total_tokens <= length


@pytest.mark.parametrize("length", [1024, 8192])
def test_ppl_and_fidelity_lengths(tokenizer, length):
    (ppl,) = build_instances("ppl", tokenizer, length, n=1)
    assert len(ppl.suffix_ids) == 512 and len(ppl.context_ids) + 512 == length
    assert ppl.max_new_tokens == 0
    (fid,) = build_instances("fidelity", tokenizer, length, n=1)
    assert fid.total_tokens == length and fid.max_new_tokens == 64


@pytest.mark.parametrize("task", ["niah", "niah_multikey", "niah_multivalue", "niah_multiquery", "vt"])
def test_needles_once_in_context_and_absent_from_suffix(tokenizer, task):
    for instance in build_instances(task, tokenizer, 2048, n=3, seed=0):
        context = decode(tokenizer, instance.context_ids)
        suffix = decode(tokenizer, instance.suffix_ids)
        for needle in needles_of(instance):
            assert context.count(needle) == 1, needle
            assert needle not in suffix
        assert "Question:" not in context and "Question:" in suffix


@pytest.mark.parametrize("task", RETRIEVAL_TASKS)
def test_query_aware_puts_the_question_in_the_context(tokenizer, task):
    (instance,) = build_instances(task, tokenizer, 1024, n=1, protocol=QUERY_AWARE)
    context = decode(tokenizer, instance.context_ids)
    suffix = decode(tokenizer, instance.suffix_ids)
    assert context.rstrip().endswith("?") or context.rstrip().endswith(".")
    assert "Question:" in context and "Question:" not in suffix
    assert suffix.startswith(" Answer:")


def test_niah_depth_cycles_from_start_to_end(tokenizer):
    instances = build_instances("niah", tokenizer, 2048, n=5, seed=0)
    assert [i.meta["depth"] for i in instances] == [0.0, 0.25, 0.5, 0.75, 1.0]
    offsets = []
    for instance in instances:
        context = decode(tokenizer, instance.context_ids)
        offsets.append(context.index(needles_of(instance)[0]) / len(context))
    assert offsets == sorted(offsets)
    assert offsets[0] < 0.1 and offsets[-1] > 0.9


def test_cwe_common_words_are_the_most_frequent(tokenizer):
    (instance,) = build_instances("cwe", tokenizer, 2048, n=1, seed=0)
    lines = decode(tokenizer, instance.context_ids).splitlines()
    words = [line.split(". ", 1)[1] for line in lines if line[:1].isdigit()]
    counts = {w: words.count(w) for w in set(words)}
    top = sorted(counts, key=counts.get, reverse=True)[: len(instance.answers)]
    assert set(top) == set(instance.answers)
    assert min(counts[w] for w in instance.answers) > max(
        c for w, c in counts.items() if w not in instance.answers
    )


@pytest.mark.parametrize("task", RETRIEVAL_TASKS)
def test_scorer_full_credit_on_gold_and_zero_on_wrong(tokenizer, task):
    (instance,) = build_instances(task, tokenizer, 1024, n=1, seed=0)
    assert score(instance, " " + ", ".join(instance.answers) + ".") == 1.0
    assert score(instance, " 00000 and nothing else.") == 0.0


def test_scorer_gives_partial_credit_and_whole_word_matches(tokenizer):
    (instance,) = build_instances("niah_multivalue", tokenizer, 1024, n=1, seed=0)
    a, b, _, _ = instance.answers
    assert score(instance, f" {a} and {b}.") == 0.5
    assert score(instance, f" 1{a}9") == 0.0
    assert score(instance, f" {a}.\nQuestion: and {b}") == 0.25


def test_perplexity_and_fidelity_are_not_scored_by_text(tokenizer):
    (instance,) = build_instances("ppl", tokenizer, 1024, n=1)
    with pytest.raises(TokensiftError):
        score(instance, "anything")


def test_jsonl_round_trip(tokenizer, tmp_path):
    instances = build_instances("niah_multiquery", tokenizer, 1024, n=2, seed=0)
    path = write_jsonl(instances, tmp_path / "tasks.jsonl")
    assert read_jsonl(path) == instances


def test_user_errors_are_one_line(tokenizer):
    with pytest.raises(TokensiftError, match="unknown task"):
        build_instances("nope", tokenizer, 1024)
    with pytest.raises(TokensiftError, match="unknown protocol"):
        build_instances("niah", tokenizer, 1024, protocol="sideways")
    with pytest.raises(TokensiftError, match="length"):
        build_instances("niah", tokenizer, 100)


@pytest.mark.parametrize("text, settled", [
    (" 19405", False),  # more digits could still follow
    (" 19405.", True),
    (" 1940", False),
    (" 55555. Then", False),  # a wrong answer never settles (the right one may follow)
    (" none\nQuestion: what", True),  # the rest is ignored by the scorer
])
def test_answer_settles_only_when_more_text_cannot_change_the_score(text, settled):
    from tokensift.bench.tasks.scoring import answer_recall, answer_settled

    assert answer_settled(["19405"], text) is settled
    if settled:
        for more in ("1", "5 and 7", "\nQuestion: 19405."):
            assert answer_recall(["19405"], text + more) == answer_recall(["19405"], text)
