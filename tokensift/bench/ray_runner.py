"""``tokensift bench --ray``: a suite's jobs spread over a Ray cluster.

Each Ray worker (an actor, one CPU) loads the model once and runs jobs the driver hands it, as
the local worker processes do. Workers never touch the run's folder (cluster nodes need not
share a disk): each row travels back to the driver, which appends it to ``results.jsonl`` as it
arrives, unless that cell is already there. A killed run resumes like any other: the next run
repairs the file and skips the cells it holds. A worker runs a job against a scratch copy of
the job's rows so far, so resumed and gated jobs see what is done.
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

from tokensift.bench.config import BenchConfig, settings_for
from tokensift.bench.jobs import Job
from tokensift.bench.pool import chosen_kernels
from tokensift.bench.results import Results, read_rows
from tokensift.errors import TokensiftError
from tokensift.ray_cluster import ray_cluster


class RelayedResults(Results):
    """A worker's results: rows go to a scratch file (read back by gated jobs) and to the driver."""

    def __init__(self, path: Path, reports):
        super().__init__(path, repair=False)
        self.reports = reports

    def write(self, row: dict) -> None:
        super().write(row)
        self.reports.put(("row", row))


class BenchWorker:
    """A Ray actor: the model loaded once, then one job per ``run`` call."""

    def __init__(self, fields: dict, threads: int):
        import torch

        from tokensift.models import load_model

        torch.set_num_threads(threads)
        self.config = BenchConfig(**fields)
        self.model, self.tokenizer = load_model(self.config.model, device=self.config.device, dtype=self.config.dtype)
        self.settings = settings_for(self.config)

    def run(self, job: Job, rows: list[dict], reports) -> None:
        """Run ``job``; ``rows``: the rows of its cells already done."""
        from tokensift.bench.runner import run_job
        from tokensift.bench.runs import RunContext

        with tempfile.TemporaryDirectory(prefix="tokensift-ray-") as scratch:
            path = Path(scratch) / "results.jsonl"
            path.write_text("".join(json.dumps(row) + "\n" for row in rows))
            results = RelayedResults(path, reports)
            context = RunContext(self.model, self.tokenizer, self.config, results, lambda n: reports.put(("units", n)))
            with chosen_kernels(self.model, self.config):
                run_job(job, context, self.settings)


def job_rows(path: Path, job: Job) -> list[dict]:
    """The rows of ``path`` that belong to ``job`` (its task, protocol and length)."""
    prefix = f"{job.task}|{job.protocol}|{job.length}|"
    return [row for row in read_rows(path) if str(row.get("cell", "")).startswith(prefix)]


def run_on_ray(config: BenchConfig, out: Path, jobs: list[Job], address: str, workers: int | None, advance, note) -> None:
    """Run ``jobs`` on the Ray cluster at ``address`` (``local``: start one here) in ``workers``
    actors (default: one per CPU of the cluster, at most one per job); rows land in ``out``."""
    with ray_cluster(address, "tokensift bench --ray") as ray:
        from ray.util.queue import Empty, Queue

        results = Results(out / "results.jsonl")  # the driver owns the file: repaired here, appended here
        count = min(len(jobs), workers or max(1, int(ray.cluster_resources().get("CPU", 1))))
        reports = Queue(actor_options={"num_cpus": 0})
        actor = ray.remote(num_cpus=1, max_restarts=0)(BenchWorker)
        pool = [actor.remote(asdict(config), 1) for _ in range(count)]
        todo, running, idle = list(jobs), {}, list(pool)

        def drain() -> None:
            while True:
                try:
                    kind, value = reports.get_nowait()
                except Empty:
                    return
                if kind == "units":
                    advance(value)
                elif value["cell"] not in results.done:
                    results.write(value)

        started = time.perf_counter()
        try:
            while todo or running:
                while idle and todo:
                    worker, job = idle.pop(), todo.pop(0)
                    running[worker.run.remote(job, job_rows(results.path, job), reports)] = (worker, job, time.perf_counter())
                finished, _ = ray.wait(list(running), num_returns=1, timeout=0.5)
                drain()
                for ref in finished:
                    worker, job, began = running.pop(ref)
                    try:
                        ray.get(ref)
                    except Exception as error:  # noqa: BLE001  (a job's error or a lost worker)
                        detail = " ".join(str(getattr(error, "cause", None) or error).split())[:300]
                        raise TokensiftError(f"bench job {job.label} failed on Ray: {detail}; "
                                             "rerun the command to resume") from None
                    drain()
                    note(f"{job.label} done on Ray in {time.perf_counter() - began:.0f} s")
                    idle.append(worker)
        finally:
            for worker in pool:
                ray.kill(worker)
            reports.shutdown(force=True)
        note(f"{len(jobs)} jobs on Ray in {time.perf_counter() - started:.0f} s")
