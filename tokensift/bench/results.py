"""The result store: ``results.jsonl``, one row per finished cell (or measurement, for the suites
that have no cells), appended atomically and read back tolerant of a run killed mid-write; a
suite's run facts (``run.json``); and the fields every row carries."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

import torch

from tokensift.bench.config import BenchConfig, Setting, cell_key
from tokensift.devices import resolve_device, resolve_dtype
from tokensift.errors import TokensiftError


def read_rows(path: Path, repair: bool = False) -> list[dict]:
    """The rows of an append-only jsonl file, tolerant of a run killed mid-write.

    A line that is not a complete JSON row (torn by a kill: unterminated, or cut short) is
    dropped, and so is a row whose ``cell`` repeats an earlier one. ``repair`` then rewrites the
    file without them, atomically (a temporary file renamed over it); the good lines keep their
    exact bytes.
    """
    if not path.exists():
        return []
    data = path.read_bytes()
    rows, good, seen, dropped = [], [], set(), False
    for line in data.splitlines(keepends=True):
        try:
            row = json.loads(line) if line.endswith(b"\n") else None
        except ValueError:
            row = None
        if not isinstance(row, dict) or row.get("cell", id(row)) in seen:
            dropped = dropped or bool(line.strip())
            continue
        seen.add(row.get("cell", id(row)))
        rows.append(row)
        good.append(line)
    if repair and dropped:
        temporary = path.with_name(path.name + ".repair")
        temporary.write_bytes(b"".join(good))
        os.replace(temporary, path)
    return rows


def append_rows(path: Path, rows: list[dict]) -> None:
    """Append ``rows`` in a single write, flushed to disk, so parallel writers never interleave lines."""
    data = "".join(json.dumps(row) + "\n" for row in rows).encode()
    handle = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        if os.write(handle, data) != len(data):
            raise OSError(f"short write to {path}")
        os.fsync(handle)
    finally:
        os.close(handle)


def write_rows(path: Path, rows: list[dict]) -> None:
    """Replace the file with ``rows``, atomically (a temporary file renamed over it)."""
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text("".join(json.dumps(row) + "\n" for row in rows))
    os.replace(temporary, path)


RUN_FILE = "run.json"


def write_run(out_dir: Path, facts: dict) -> None:
    """Facts about the run a suite's report states that no row holds (machine load before and
    after, what was asked for), in ``out_dir/run.json``."""
    (Path(out_dir) / RUN_FILE).write_text(json.dumps(facts, indent=1) + "\n")


def read_run(out_dir: Path) -> dict:
    """What :func:`write_run` wrote (a one-line error when the folder has none)."""
    path = Path(out_dir) / RUN_FILE
    if not path.is_file():
        raise TokensiftError(f"{path} is missing: the report needs the run's facts written there by the suite's run")
    return json.loads(path.read_text())


class Results:
    """``results.jsonl``: one row per finished cell; rerunning skips what is there.

    Rows are appended with one ``write`` each and flushed to disk; a row torn by a kill is
    dropped (and the file repaired) when the next run reads the file (``repair``: only the
    process that owns the run, never a worker while others append).
    """

    def __init__(self, path: Path, repair: bool = True):
        self.path = path
        self.done = {row["cell"] for row in read_rows(path, repair=repair)}

    def pending(self, task: str, protocol: str, length: int, settings: list[Setting]) -> list[Setting]:
        return [s for s in settings if cell_key(task, protocol, length, s) not in self.done]

    def write(self, row: dict) -> None:
        """Append one row in a single write, so parallel workers never interleave lines."""
        append_rows(self.path, [row])
        self.done.add(row["cell"])


def environment(config: BenchConfig) -> dict:
    import transformers

    import tokensift

    return {
        "versions": {"tokensift": tokensift.__version__, "torch": torch.__version__, "transformers": transformers.__version__},
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(), "python": platform.python_version()},
        "seed": config.seed,
        "suite": config.suite,
        "kernels": config.kernels,
        "model": model_name(config.model),
        "device": str(resolve_device(config.device)),
        "dtype": str(resolve_dtype(config.dtype)).removeprefix("torch."),
    }


def model_name(model: str | None) -> str:
    """The model as rows and reports name it (``smollm2`` when none was given)."""
    from tokensift.models import DEFAULT_MODEL

    return model or DEFAULT_MODEL


def make_row(task, protocol, length, setting: Setting, config, scores: list[float], extra: dict) -> dict:
    policy = setting.build()
    row = {
        "cell": cell_key(task, protocol, length, setting), "library": "tokensift", "task": task,
        "protocol": protocol, "length": length, "policy": setting.policy, "budget": setting.budget,
        "ratio": setting.ratio, "params": policy.params(), "samples": len(scores),
        "score": sum(scores) / len(scores) if scores else float("nan"), "sample_scores": scores,
    }
    row.update(extra)
    row.update(environment(config))
    return row


def full_score(path: Path, cell: str) -> float | None:
    """The score of ``cell`` in a results file (None if it is not there)."""
    if not path.exists():
        return None
    for line in path.read_text().splitlines():
        if line.strip() and f'"{cell}"' in line:
            row = json.loads(line)
            if row.get("cell") == cell:
                return row.get("score")
    return None
