"""Side-by-side runs of NVIDIA kvpress on tokensift's task instances.

kvpress pins an older ``transformers`` (< 5.3) than tokensift uses, so it runs in its own
virtualenv (:func:`ensure_kvpress_venv`) through the standalone ``kvpress_worker.py``; this
module writes the job, drives the worker with ``subprocess`` and scores its rows with the task
scorers.

Ratios: tokensift's ``keep_ratio`` is the fraction of context tokens KEPT; kvpress's
``compression_ratio`` is the fraction REMOVED. Keeping 12.5% is kvpress 0.875. Every row
records both.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tokensift.bench.tasks import TaskInstance, default_tokenizer, get_task, read_jsonl
from tokensift.bench.tasks.tokenizer import cache_root, embedded_gguf_path
from tokensift.errors import TokensiftError

KVPRESS_VERSION = "0.5.5"
KVPRESS_TRANSFORMERS = "5.2.0"
TORCH_VERSION = "2.13.0"
KVPRESS_REQUIREMENTS = (
    f"kvpress=={KVPRESS_VERSION}",
    f"transformers=={KVPRESS_TRANSFORMERS}",
    "gguf>=0.10",
    "accelerate>=1.0",
)
# kvpress's real runtime needs, for an install with --no-deps when its own pins cannot resolve.
KVPRESS_RUNTIME_DEPS = (
    f"transformers=={KVPRESS_TRANSFORMERS}", "accelerate>=1.0", "gguf>=0.10", "numpy>=2,<3",
    "cachetools>=5.5.2,<6", "requests", "pandas", "datasets", "peft", "fire",
)
PRESSES = (
    "snapkv", "streaming_llm", "tova", "knorm", "observed_attention", "expected_attention",
    "pyramidkv", "adakv_snapkv", "adakv_expected_attention",
)
KNOWN_PRESSES = ("full", *PRESSES)
WORKER = Path(__file__).with_name("kvpress_worker.py")
READY_MARKER = ".tokensift-kvpress-ready"


def keep_to_compression_ratio(keep_ratio: float) -> float:
    """tokensift's kept fraction -> kvpress's removed fraction (keep 0.125 -> 0.875)."""
    if not 0.0 < keep_ratio <= 1.0:
        raise TokensiftError(f"keep ratio must be in (0, 1], got {keep_ratio}")
    return round(1.0 - keep_ratio, 10)


def compression_to_keep_ratio(compression_ratio: float) -> float:
    """kvpress's removed fraction -> tokensift's kept fraction."""
    if not 0.0 <= compression_ratio < 1.0:
        raise TokensiftError(f"kvpress compression ratio must be in [0, 1), got {compression_ratio}")
    return round(1.0 - compression_ratio, 10)


# --- the kvpress virtualenv -------------------------------------------------------------


def default_venv_path() -> Path:
    """``$TOKENSIFT_CACHE/kvpress-venv`` (``~/.cache/tokensift/kvpress-venv`` by default)."""
    return cache_root() / "kvpress-venv"


def venv_python(path: Path) -> Path:
    """The interpreter inside a virtualenv."""
    return path / "bin" / "python"


def ensure_kvpress_venv(path: str | Path | None = None) -> Path:
    """Create (once) a virtualenv with kvpress and return its python.

    torch==2.13.0 is installed first (the CPU wheel; any other version would pull a multi-GB
    CUDA build), then kvpress with a transformers it supports, gguf and accelerate. A dry run
    checks that nothing asks for another torch; if something does, kvpress is installed with
    ``--no-deps`` and its runtime needs one by one.
    """
    path = Path(path) if path else default_venv_path()
    python = venv_python(path)
    marker = path / READY_MARKER
    if python.exists() and marker.is_file() and marker.read_text() == _marker_text():
        return python
    started = time.monotonic()
    _create_venv(path)
    _pip(python, "install", f"torch=={TORCH_VERSION}")
    if _dry_run_changes_torch(python, KVPRESS_REQUIREMENTS):
        _pip(python, "install", "--no-deps", f"kvpress=={KVPRESS_VERSION}")
        _pip(python, "install", *KVPRESS_RUNTIME_DEPS)
    else:
        _pip(python, "install", *KVPRESS_REQUIREMENTS)
    _check_venv(python)
    marker.write_text(_marker_text())
    print(f"kvpress venv ready at {path} in {time.monotonic() - started:.0f} s", file=sys.stderr)
    return python


def _marker_text() -> str:
    """What the ready marker holds: the pinned versions (a change rebuilds the venv)."""
    return f"kvpress=={KVPRESS_VERSION} transformers=={KVPRESS_TRANSFORMERS} torch=={TORCH_VERSION}\n"


def _create_venv(path: Path) -> None:
    """``python -m venv`` with the base interpreter of the running Python."""
    base = getattr(sys, "_base_executable", sys.executable)
    _run([base, "-m", "venv", str(path)], "create the kvpress virtualenv")


def _pip(python: Path, *args: str) -> str:
    """Run pip inside the venv; one-line error on failure."""
    return _run([str(python), "-m", "pip", *args], f"pip {' '.join(args[:3])}")


def _run(command: list[str], what: str) -> str:
    """Run a command, return stdout, raise a one-line TokensiftError if it fails."""
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise TokensiftError(f"could not {what}: {last}")
    return result.stdout


def _dry_run_changes_torch(python: Path, requirements: tuple[str, ...]) -> bool:
    """Whether installing ``requirements`` would install or replace torch."""
    report = _pip(python, "install", "--dry-run", "--quiet", "--report", "-", *requirements)
    installs = json.loads(report or "{}").get("install", [])
    return any(item.get("metadata", {}).get("name", "").lower() == "torch" for item in installs)


def _check_venv(python: Path) -> None:
    """Import kvpress and confirm the torch version inside the venv."""
    code = "import kvpress, torch, transformers; print(torch.__version__, transformers.__version__)"
    torch_version, _ = _run([str(python), "-c", code], "import kvpress in its venv").split()
    if not torch_version.startswith(TORCH_VERSION):
        raise TokensiftError(f"kvpress venv has torch {torch_version}, expected {TORCH_VERSION}")


# --- jobs and rows ----------------------------------------------------------------------


def make_runs(presses: list[str], keep_ratios: list[float]) -> list[dict]:
    """One run per (press, keep ratio), carrying both ratio conventions."""
    unknown = [p for p in presses if p not in KNOWN_PRESSES]
    if unknown:
        raise TokensiftError(f"unknown kvpress press {unknown[0]!r}; use: {', '.join(KNOWN_PRESSES)}")
    return [
        {"press": press, "keep_ratio": keep, "compression_ratio": keep_to_compression_ratio(keep)}
        for press in presses
        for keep in keep_ratios
    ]


def model_files(model: str | None) -> tuple[Path, Path | None]:
    """The GGUF file the kvpress worker loads for ``model`` and the tokenizer folder to pair with it.

    ``None``/``smollm2``: the embedded SmolLM2; ``gemma3``: Gemma 3 270M (its converted folder holds
    the tokenizer tokensift uses); a ``.gguf`` path: that file (tokenizer read from the file).
    """
    from tokensift.models import DEFAULT_MODEL, GEMMA_ALIASES, converted_dir, ensure_converted, gemma3_gguf

    if model in (None, "", DEFAULT_MODEL):
        return embedded_gguf_path(), _saved_tokenizer_dir()
    if model in GEMMA_ALIASES:
        gguf = gemma3_gguf()
        ensure_converted(gguf)
        return gguf, converted_dir(gguf)
    path = Path(model).expanduser()
    if path.suffix == ".gguf" and path.exists():
        return path.resolve(), None
    raise TokensiftError(f"kvpress compare needs smollm2, gemma3 or a .gguf file (kvpress loads GGUF weights), got {model!r}")


def write_job(instances_path: Path, runs: list[dict], rows_path: Path, job_path: Path, threads: int,
              separate: bool = False, done: list[str] | None = None, model: str | None = None,
              device: str | None = None, dtype: str | None = None) -> Path:
    """The json the worker reads (``done``: ``key|press|keep_ratio`` pairs it skips)."""
    gguf, tokenizer_dir = model_files(model)
    job = {
        "instances": str(instances_path),
        "out": str(rows_path),
        "gguf": str(gguf),
        "tokenizer": str(tokenizer_dir) if tokenizer_dir else None,
        "threads": threads,
        "device": device,
        "dtype": dtype,
        "runs": runs,
        "separate": separate,
        "done": done or [],
    }
    job_path.write_text(json.dumps(job, indent=1))
    return job_path


def _saved_tokenizer_dir() -> Path | None:
    """The tokenizer folder tokensift cached (loading it first if needed)."""
    default_tokenizer()
    folders = sorted((cache_root() / "tokenizers").glob(f"{embedded_gguf_path().stem}-*"))
    return folders[-1] if folders else None


def score_row(row: dict, instance: TaskInstance) -> dict:
    """Add ``score`` (task scorer on the generated text) to a worker row, where it applies."""
    scored = dict(row)
    if row.get("status") != "ok" or "generated_text" not in row:
        scored["score"] = None
        return scored
    try:
        scored["score"] = get_task(instance.task).score(instance, row["generated_text"])
    except TokensiftError:  # ppl / fidelity are scored by the runner, not by gold text
        scored["score"] = None
    return scored


def run(
    instances_path: str | Path,
    presses: list[str],
    ratios: list[float],
    out_jsonl: str | Path,
    *,
    venv: str | Path | None = None,
    threads: int = 2,
    timeout_s: float | None = None,
    separate: bool = False,
    model: str | None = None,
    device: str | None = None,
    dtype: str | None = None,
) -> list[dict]:
    """Run kvpress ``presses`` at each kept fraction in ``ratios`` on the instances; score rows.

    ``ratios`` are tokensift keep ratios (fraction kept). Writes scored rows to ``out_jsonl`` and
    returns them. Presses that fail on this model or machine come back with ``status: error``.
    The worker's raw rows go to ``out_jsonl`` + ``.raw`` as they come; a rerun skips them.
    ``separate``: one prefill per press through kvpress's own hook instead of a shared prefill.
    ``device``/``dtype``: where and in what the worker runs the model (resolved names: "cuda:0", "bfloat16").
    """
    instances_path = Path(instances_path)
    instances = {i.key: i for i in read_jsonl(instances_path)}
    runs = make_runs(list(presses), list(ratios))
    raw_path = Path(str(out_jsonl) + ".raw")
    raw_path.parent.mkdir(parents=True, exist_ok=True)
    wanted = {pair_key(key, run_) for key in instances for run_ in runs}
    done = [pair_key(row["key"], row) for row in read_rows(raw_path) if row.get("status") == "ok"]
    if wanted - set(done):
        python = ensure_kvpress_venv(venv)
        with tempfile.TemporaryDirectory(prefix="tokensift-kvpress-") as tmp:
            job = write_job(instances_path.resolve(), runs, raw_path.resolve(), Path(tmp) / "job.json", threads, separate, done,
                            model, device, dtype)
            _run_worker(python, job, timeout_s)
    latest = {pair_key(row["key"], row): row for row in read_rows(raw_path)}
    rows = [score_row(latest[pair], instances[pair.split("|")[0]]) for pair in sorted(wanted) if pair in latest]
    out_path = Path(out_jsonl)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return rows


def pair_key(instance_key: str, run: dict) -> str:
    """``instance|press|keep ratio``: one worker row."""
    return f"{instance_key}|{run['press']}|{round(run['keep_ratio'], 9)}"


def read_rows(path: Path) -> list[dict]:
    """The worker's rows so far (none before its first run; a row torn by a killed worker is dropped)."""
    from tokensift.bench.results import read_rows as complete_rows

    return complete_rows(path)


def _run_worker(python: Path, job: Path, timeout_s: float | None) -> None:
    """Start the worker in the kvpress venv and wait; one-line error if it dies."""
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": ""}
    try:
        result = subprocess.run(
            [str(python), str(WORKER), str(job)], capture_output=True, text=True, env=env,
            timeout=timeout_s,
        )
    except subprocess.TimeoutExpired:
        raise TokensiftError(f"kvpress worker ran past {timeout_s} s; try fewer instances") from None
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise TokensiftError(f"kvpress worker failed: {last}")


def summarize(rows: list[dict]) -> dict:
    """Mean score and kept tokens per (press, keep ratio); errors listed with their reason."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["press"], row["keep_ratio"]), []).append(row)
    summary = {}
    for (press, keep), group in sorted(groups.items()):
        scores = [r["score"] for r in group if r.get("score") is not None]
        errors = sorted({r["error"] for r in group if r.get("status") == "error"})
        summary[f"{press}@keep={keep}"] = {
            "n": len(group),
            "mean_score": sum(scores) / len(scores) if scores else None,
            "mean_kv_tokens_kept": _mean(r.get("kv_tokens_effective") for r in group),
            "errors": errors,
        }
    return summary


def _mean(values) -> float | None:
    """Mean of the non-missing values."""
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None
