"""Benchmark tasks: deterministic prompts built from real essays, as token ids, with scorers.

Typical use::

    from tokensift.bench.tasks import build_instances, default_tokenizer, score, write_jsonl

    tokenizer = default_tokenizer()
    instances = build_instances("niah", tokenizer, length=4096, n=5, seed=0)
    write_jsonl(instances, "niah-4k.jsonl")
    score(instances[0], "The special magic number for ... is 58213.")

Tasks: niah, niah_multikey, niah_multivalue, niah_multiquery, vt, cwe (RULER-style retrieval), essay_qa
(a question about the essay text itself),
ppl (perplexity stream) and fidelity (continuation prompts). See ``base`` for the length rule.
"""

from __future__ import annotations

from tokensift.bench.tasks import cwe, essay_qa, fidelity, niah, niah_multikey, niah_multiquery, niah_multivalue, ppl, vt  # noqa: F401  (registration)
from tokensift.bench.tasks.base import ANSWER_ROOM, context_length
from tokensift.bench.tasks.instance import (
    PROTOCOLS, QUERY_AGNOSTIC, QUERY_AWARE, TaskInstance, read_jsonl, write_jsonl,
)
from tokensift.bench.tasks.registry import TASKS, Task, get_task
from tokensift.bench.tasks.tokenizer import default_tokenizer

RULER_TASKS = ("niah", "niah_multikey", "niah_multivalue", "niah_multiquery", "vt", "cwe")
RETRIEVAL_TASKS = RULER_TASKS + ("essay_qa",)  # tasks answered by greedy decoding after the context


def list_tasks() -> list[str]:
    """Names of all registered tasks."""
    return sorted(TASKS)


def build_instances(
    task: str, tokenizer, length: int, n: int = 5, seed: int = 0, protocol: str = QUERY_AGNOSTIC
) -> list[TaskInstance]:
    """``n`` instances of ``task`` at ``length`` tokens, fully determined by ``seed``."""
    spec = get_task(task)
    return [spec.build(tokenizer, length, index, seed, protocol) for index in range(n)]


def score(instance: TaskInstance, generated: str) -> float:
    """Score generated text for an instance with its task's scorer, in [0, 1]."""
    return get_task(instance.task).score(instance, generated)


__all__ = [
    "ANSWER_ROOM", "PROTOCOLS", "QUERY_AGNOSTIC", "QUERY_AWARE", "RETRIEVAL_TASKS", "RULER_TASKS", "TASKS",
    "Task", "TaskInstance", "build_instances", "context_length", "default_tokenizer",
    "get_task", "list_tasks", "read_jsonl", "score", "write_jsonl",
]
