"""``tokensift bench``: the quality/cost matrix on shipped real data, resumable.

Cells are (task, protocol, length, policy, budget). The pieces, one job each:

- :mod:`tokensift.bench.config`: what to run (:class:`BenchConfig`, the suites, the settings);
- :mod:`tokensift.bench.jobs`: the run cut into jobs, heaviest first;
- :mod:`tokensift.bench.runs`: how each kind of task runs (retrieval, ppl, fidelity, cost),
  each task naming its kind in the task registry;
- :mod:`tokensift.bench.decode`: the one greedy decode loop;
- :mod:`tokensift.bench.results`: the result store (``results.jsonl``);
- :mod:`tokensift.bench.pool` (local processes) and :mod:`tokensift.bench.ray_runner` (Ray):
  jobs spread over workers;
- :mod:`tokensift.bench.progress`: the progress bar.

This module drives a run (:func:`run_bench`), declares the four text suites as one
:class:`~tokensift.bench.suite.Suite` (``SUITE``: ``bench --suite quick|standard|full|long``) and
re-exports the names other modules import.
"""

from __future__ import annotations

import json
from dataclasses import asdict, replace
from pathlib import Path

from tokensift.bench.config import (  # noqa: F401  (re-exported)
    ALL_TOKENS, KERNELS, SUITES, WRAPPED_DEFAULTS, BenchConfig, Setting, cell_key, check_config, default_policies,
    settings_for,
)
from tokensift.bench.decode import greedy_tokens  # noqa: F401  (re-exported)
from tokensift.bench.jobs import (  # noqa: F401  (re-exported)
    Job, cost_settings, cost_units, job_settings, job_units, kind_of, pending_job, plan_jobs,
)
from tokensift.bench.pool import chosen_kernels, run_in_workers, worker_main  # noqa: F401  (re-exported)
from tokensift.bench.results import Results, environment, full_score, make_row, model_name, read_rows  # noqa: F401
from tokensift.bench.runs import (  # noqa: F401  (re-exported)
    MERGE_ROWS, MERGE_TOKENS, RUNS, RunContext, answer_scores, decode_chunk, is_mergeable, merge_groups, run_cost,
    run_fidelity, run_gated, run_ppl, run_retrieval, teacher_forced_logits, token_ids,
)
from tokensift.bench.suite import Suite
from tokensift.devices import resolve_device, resolve_dtype, run_fields
from tokensift.errors import TokensiftError


def run_job(job: Job, context: RunContext, settings: list[Setting]) -> None:
    """Run ``job`` the way its task says (``Task.runs``, a key of :data:`~tokensift.bench.runs.RUNS`)."""
    RUNS[kind_of(job.task)](context, job, job_settings(job, context.config, settings))


def run_bench(config: BenchConfig, out: Path, model=None, tokenizer=None, workers: int = 1,
              ray: str | None = None) -> None:
    """Run (or resume) the matrix in ``out`` and write the report and plots.

    ``workers`` > 1 runs the jobs in that many processes (each loads ``config.model``), then
    ``cost`` alone in this process so its timings are not disturbed. ``ray`` (an address, or
    ``local``) runs the jobs on a Ray cluster instead (``workers`` > 1: that many Ray workers).
    """
    from rich.console import Console

    from tokensift.bench.progress import bench_progress
    from tokensift.bench.report import write_report
    from tokensift.models import load_model

    if workers < 1:
        raise TokensiftError(f"--workers must be at least 1, got {workers}")
    if config.kernels not in KERNELS:
        raise TokensiftError(f"unknown kernels '{config.kernels}'; use one of: {', '.join(KERNELS)}")
    resolve_device(config.device), resolve_dtype(config.dtype)  # one-line errors before anything is written
    check_config(config)
    if ray is not None:
        from tokensift.ray_cluster import check_address, require_ray

        require_ray("tokensift bench --ray"), check_address(ray, "tokensift bench --ray")
    if model is not None:  # rows record where the given model really runs
        config = replace(config, **run_fields(model))
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(asdict(config), indent=1))
    results = Results(out / "results.jsonl")
    settings = settings_for(config)
    jobs = [job for job in plan_jobs(config) if pending_job(job, config, results, settings)]
    console = Console(stderr=True)
    total = sum(job_units(job, config, settings) for job in jobs) + cost_units(config, settings)
    with bench_progress(console, total) as progress:
        if ray is not None and jobs:
            from tokensift.bench.ray_runner import run_on_ray

            progress.describe(f"{len(jobs)} jobs on Ray")
            run_on_ray(config, out, jobs, ray, workers if workers > 1 else None, progress.advance, progress.note)
            results = Results(out / "results.jsonl")
            jobs = []
        elif workers > 1 and jobs:
            progress.describe(f"{len(jobs)} jobs in {workers} workers")
            run_in_workers(config, out, jobs, workers, progress.advance, progress.note)
            results = Results(out / "results.jsonl")
            jobs = []
        if model is None and (jobs or cost_units(config, settings)):
            model, tokenizer = load_model(config.model, device=config.device, dtype=config.dtype)
        context = RunContext(model, tokenizer, config, results, progress.advance)
        with chosen_kernels(model, config):
            for job in jobs:
                progress.describe(job.label)
                run_job(job, context, settings)
                progress.note(f"{job.label} done")
            for length in config.cost_lengths if "cost" in config.tasks else []:
                progress.describe(f"cost {length}")
                run_cost(context, Job("cost", length), settings)
                progress.note(f"cost {length} done")
    write_report(out)
    console.print(f"results: {out / 'results.jsonl'}  report: {out / 'report.md'}")


def run_text_suite(out: Path, *, suite: str, device: str = "cpu", dtype: str = "float32", workers: int = 1,
                   ray: str | None = None, **overrides) -> None:
    """``bench --suite quick|standard|full|long``: the suite's :class:`BenchConfig`, the options given winning."""
    config = BenchConfig.for_suite(suite, device=device, dtype=dtype, **overrides)
    run_bench(config, out, workers=workers, ray=ray)


SUITE = Suite(
    names=tuple(SUITES),
    options=("suite", "model", "policies", "budgets", "ratios", "lengths", "tasks", "protocols", "samples", "seed",
             "full_only_tasks", "lm_budgets", "workers", "ray", "kernels"),
    runner=f"{__name__}:run_text_suite",
    reporter="tokensift.bench.report:write_report",
)
