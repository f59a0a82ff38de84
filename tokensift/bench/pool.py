"""The worker pool: a run's jobs spread over local processes sharing the cores, each loading the
model once and appending its own rows to ``results.jsonl``."""

from __future__ import annotations

import multiprocessing
import queue
import time
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path

import torch

from tokensift.bench.config import BenchConfig, settings_for
from tokensift.bench.jobs import Job
from tokensift.bench.results import Results
from tokensift.errors import TokensiftError
from tokensift.kernels import packed_linears


def chosen_kernels(model, config: BenchConfig):
    """The linear kernels ``config`` asks for, for the ``with`` block that runs jobs on ``model``."""
    return packed_linears(model, config.kernels == "packed") if model is not None else nullcontext()


def worker_main(fields: dict, out: str, todo, reports, threads: int) -> None:
    """A worker process: load the model once, then run jobs from ``todo`` until ``None``."""
    from tokensift.bench.runner import run_job
    from tokensift.bench.runs import RunContext
    from tokensift.models import load_model

    torch.set_num_threads(threads)
    try:
        config = BenchConfig(**fields)
        model, tokenizer = load_model(config.model, device=config.device, dtype=config.dtype)
        results, settings = Results(Path(out) / "results.jsonl", repair=False), settings_for(config)
        context = RunContext(model, tokenizer, config, results, lambda n: reports.put(("units", n)))
        with chosen_kernels(model, config):
            for job in iter(todo.get, None):
                started = time.perf_counter()
                run_job(job, context, settings)
                reports.put(("job", f"{job.label} done in {time.perf_counter() - started:.0f} s"))
    except Exception as error:  # noqa: BLE001  (reported to the parent, which stops the run)
        reports.put(("error", f"{type(error).__name__}: {error}"))
        return
    reports.put(("done", None))


def run_in_workers(config: BenchConfig, out: Path, jobs: list[Job], workers: int, advance, note) -> None:
    """Run ``jobs`` in ``workers`` processes sharing the cores; each appends its own rows."""
    context = multiprocessing.get_context("spawn")
    todo, reports = context.Queue(), context.Queue()
    for job in jobs + [None] * workers:
        todo.put(job)
    threads = max(1, torch.get_num_threads() // workers)
    processes = [context.Process(target=worker_main, args=(asdict(config), str(out), todo, reports, threads)) for _ in range(workers)]
    for process in processes:
        process.start()
    try:
        finished = 0
        while finished < workers:
            try:
                kind, value = reports.get(timeout=5)
            except queue.Empty:
                if any(p.exitcode not in (None, 0) for p in processes):
                    raise TokensiftError("a bench worker died (out of memory?); rerun the command to resume") from None
                continue
            if kind == "error":
                raise TokensiftError(f"bench worker failed: {value}; rerun the command to resume")
            finished += kind == "done"
            if kind == "units":
                advance(value)
            elif kind == "job":
                note(value)
    finally:
        for process in processes:
            if process.is_alive():
                process.terminate()
            process.join()
