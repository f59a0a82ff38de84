"""Task registry: each task file registers one :class:`Task` under its name."""

from __future__ import annotations

import random

from tokensift.bench.tasks.base import MAX_ATTEMPTS, instance_rng
from tokensift.bench.tasks.instance import TaskInstance, check_protocol
from tokensift.bench.tasks.scoring import answer_recall, answer_settled
from tokensift.errors import TokensiftError

TASKS: dict[str, "Task"] = {}


class Task:
    """A deterministic prompt generator plus its scorer.

    Subclasses set ``name`` (and ``runs``, how the benchmark runs the task: ``retrieval``
    greedy-decodes an answer after the context, ``ppl`` and ``fidelity`` score the
    continuation) and implement :meth:`make`; :meth:`build` retries with a fresh
    draw (still determined by the seed) until every needle occurs exactly once in the context
    and never in the suffix.
    """

    name: str = ""
    description: str = ""
    runs: str = "retrieval"  # how the benchmark runs it (a key of tokensift.bench.runs.RUNS)

    def make(
        self, tokenizer, rng: random.Random, length: int, index: int, seed: int, protocol: str
    ) -> tuple[TaskInstance, list[str]]:
        """Return an instance and the needle texts that must occur once in its context."""
        raise NotImplementedError

    def build(self, tokenizer, length: int, index: int, seed: int, protocol: str) -> TaskInstance:
        """The instance number ``index`` of this task for ``seed`` and ``length``."""
        check_protocol(protocol)
        for attempt in range(MAX_ATTEMPTS):
            rng = instance_rng(self.name, seed, length, index, attempt)
            instance, needles = self.make(tokenizer, rng, length, index, seed, protocol)
            if _needles_ok(tokenizer, instance, needles):
                return instance
        raise AssertionError(f"{self.name}: no clean instance after {MAX_ATTEMPTS} draws")

    def score(self, instance: TaskInstance, generated: str) -> float:
        """Fraction of the gold answers present in the generated text, in [0, 1]."""
        return answer_recall(instance.answers, generated)

    def settled(self, instance: TaskInstance, generated: str) -> bool:
        """Whether more generated text can no longer change :meth:`score` (decoding may stop)."""
        return answer_settled(instance.answers, generated)


def _needles_ok(tokenizer, instance: TaskInstance, needles: list[str]) -> bool:
    """Each needle once in the context text and absent from the suffix text."""
    context = tokenizer.decode(instance.context_ids)
    suffix = tokenizer.decode(instance.suffix_ids)
    return all(context.count(n) == 1 and n not in suffix for n in needles)


def register(cls: type[Task]) -> type[Task]:
    """Class decorator: add one instance of ``cls`` to the registry under ``cls.name``."""
    TASKS[cls.name] = cls()
    return cls


def get_task(name: str) -> Task:
    """The registered task called ``name``."""
    try:
        return TASKS[name]
    except KeyError:
        raise TokensiftError(f"unknown task {name!r}; use one of: {', '.join(sorted(TASKS))}") from None
