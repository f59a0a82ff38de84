"""Job planning: a run's matrix cut into jobs (a task at one length and protocol), heaviest first,
with the settings each job runs and its progress units."""

from __future__ import annotations

from dataclasses import dataclass

from tokensift.bench.config import BenchConfig, Setting, settings_for
from tokensift.bench.results import Results
from tokensift.bench.tasks import QUERY_AGNOSTIC, TASKS


@dataclass(frozen=True)
class Job:
    """One unit of scheduling: a task at one length and protocol (``full_only``: full cache only)."""

    task: str
    length: int
    protocol: str = QUERY_AGNOSTIC
    full_only: bool = False

    @property
    def label(self) -> str:
        protocol = f" {self.protocol}" if kind_of(self.task) == "retrieval" else ""
        return f"{self.task}{protocol} {self.length}{' (full cache only)' if self.full_only else ''}"


def kind_of(task: str) -> str | None:
    """How ``task`` runs (its registered ``Task.runs``: ``retrieval``, ``ppl``, ``fidelity``); None if unregistered (``cost``)."""
    spec = TASKS.get(task)
    return None if spec is None else spec.runs


def plan_jobs(config: BenchConfig) -> list[Job]:
    """Every job of the run except ``cost`` (which runs last, alone), the heaviest first (workers
    take them in order, so the small full-cache-only jobs fill the gaps at the end)."""
    named = config.tasks + [t for t in config.full_only_tasks if t not in config.tasks]
    retrieval = [t for t in named if kind_of(t) == "retrieval"]
    jobs = [Job(t, n, p, t in config.full_only_tasks) for n in config.lengths for p in config.protocols for t in retrieval]
    every_policy = [job for job in jobs if not job.full_only]
    language = [Job("ppl", config.ppl_length)] if "ppl" in config.tasks else []
    language += [Job("fidelity", n) for n in config.lengths if "fidelity" in config.tasks]
    return every_policy + language + [job for job in jobs if job.full_only]


def job_settings(job: Job, config: BenchConfig, settings: list[Setting]) -> list[Setting]:
    if job.full_only:
        return [Setting("full")]
    if kind_of(job.task) in ("ppl", "fidelity") and config.lm_budgets:
        return settings_for(config, budgets=config.lm_budgets)
    return settings


def job_units(job: Job, config: BenchConfig, settings: list[Setting]) -> int:
    count = len(job_settings(job, config, settings))
    samples = {"ppl": config.ppl_samples, "fidelity": config.fidelity_samples}.get(kind_of(job.task), config.samples_at(job.length))
    return count * samples


def pending_job(job: Job, config: BenchConfig, results: Results, settings: list[Setting]) -> bool:
    chosen = job_settings(job, config, settings)
    return bool(results.pending(job.task, job.protocol, job.length, chosen))


def cost_units(config: BenchConfig, settings: list[Setting]) -> int:
    if "cost" not in config.tasks:
        return 0
    return len(cost_settings(config, settings)) * len(config.cost_lengths)


def cost_settings(config: BenchConfig, settings: list[Setting]) -> list[Setting]:
    """The settings the cost task measures: ``full`` and every policy at the middle budget."""
    budget = config.budgets[len(config.budgets) // 2] if config.budgets else None
    return [s for s in settings if s.policy == "full" or s.budget == budget]
