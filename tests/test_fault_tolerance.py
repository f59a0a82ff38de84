"""Fault tolerance of long runs: a benchmark killed (SIGKILL) in the middle of writing a row or at
a random moment of a job resumes to the same results as a run never interrupted, with no torn
or duplicated rows; the results file is repaired on read (atomically).

``TOKENSIFT_FUZZ=long`` kills the run at more random moments (``KILLS``, default 12).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from tokensift.bench.kvpress_compare import read_rows as kvpress_rows
from tokensift.bench.runner import BenchConfig, Results, read_rows, run_bench

LONG = os.environ.get("TOKENSIFT_FUZZ") == "long"
RANDOM_KILLS = int(os.environ.get("KILLS", "12")) if LONG else 1
TEARS = (2, 3) if LONG else (2,)
TIMING = ("wall_seconds_group",)  # the only fields that legitimately differ between two runs
ROW = {"cell": "niah|query_agnostic|600|snapkv@64", "score": 0.5}


# ------------------------------------------------------------------------ repair on read
def test_torn_last_row_is_dropped_and_the_file_repaired(tmp_path):
    path = tmp_path / "results.jsonl"
    good = json.dumps(ROW) + "\n"
    torn = json.dumps({**ROW, "cell": "vt|query_agnostic|600|full"})
    path.write_text(good + torn[: len(torn) // 2])
    results = Results(path)
    assert results.done == {ROW["cell"]}
    assert path.read_text() == good  # the good row keeps its bytes; the torn one is gone
    results.write({**ROW, "cell": "x"})
    assert [row["cell"] for row in read_rows(path)] == [ROW["cell"], "x"]


def test_duplicated_and_garbage_rows_are_dropped(tmp_path):
    path = tmp_path / "results.jsonl"
    line = json.dumps(ROW) + "\n"
    path.write_text(line + "{not json\n" + line + json.dumps({**ROW, "cell": "y"}) + "\n")
    assert [row["cell"] for row in read_rows(path, repair=True)] == [ROW["cell"], "y"]
    assert path.read_text() == line + json.dumps({**ROW, "cell": "y"}) + "\n"
    assert not list(tmp_path.glob("*.repair"))


def test_a_worker_never_rewrites_the_file(tmp_path):
    path = tmp_path / "results.jsonl"
    path.write_text(json.dumps(ROW) + "\n" + '{"cell": "torn')
    before = path.read_bytes()
    assert Results(path, repair=False).done == {ROW["cell"]}
    assert path.read_bytes() == before


def test_kvpress_rows_of_a_killed_worker_are_read(tmp_path):
    raw = tmp_path / "kvpress_rows.jsonl.raw"
    raw.write_text(json.dumps({"key": "a", "status": "ok"}) + "\n" + json.dumps({"key": "b", "status": "ok"}) + "\n"
                   + '{"key": "c", "sta')
    assert [row["key"] for row in kvpress_rows(raw)] == ["a", "b"]


# ------------------------------------------------------------------------ killed for real
DRIVER = textwrap.dedent("""
    import json, os, signal, sys
    from pathlib import Path
    import torch
    torch.set_num_threads(1)
    import tokensift.bench.runner as runner

    config_path, out, tear_at = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
    written, original = [0], runner.Results.write

    def write(self, row):  # the tear_at-th row of this run: half of it reaches the file, then SIGKILL
        written[0] += 1
        if written[0] == tear_at:
            line = (json.dumps(row) + "\\n").encode()
            handle = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
            os.write(handle, line[: len(line) // 2])
            os.kill(os.getpid(), signal.SIGKILL)
        original(self, row)

    runner.Results.write = write
    runner.run_bench(runner.BenchConfig(**json.loads(Path(config_path).read_text())), out)
""")


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    from tokensift.bench.tasks import default_tokenizer

    folder = tmp_path_factory.mktemp("model")
    tokenizer = default_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=8192)
    LlamaForCausalLM(config).eval().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def canonical(path: Path) -> bytes:
    """The rows, sorted by cell, without the timing fields, as bytes."""
    rows = sorted(({k: v for k, v in row.items() if k not in TIMING} for row in read_rows(path)), key=lambda r: r["cell"])
    return "".join(json.dumps(row, sort_keys=True) + "\n" for row in rows).encode()


def test_bench_killed_mid_row_and_mid_job_resumes_to_the_same_rows(tmp_path, saved_model):
    config = BenchConfig.for_suite("quick", policies=["full", "snapkv", "h2o"], budgets=[64], lengths=[600], samples=1,
                                   tasks=["niah", "vt", "fidelity"], model=str(saved_model))
    config_path = tmp_path / "config.json"
    config_path.write_text(json.dumps(config.__dict__))
    reference, resumed = tmp_path / "reference", tmp_path / "resumed"
    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # as the driver runs: rows record the threads, and other test modules set 2 on import
    try:
        run_bench(config, reference)
    finally:
        torch.set_num_threads(previous)
    expected = canonical(reference / "results.jsonl")
    assert expected.count(b"\n") == 9

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent.parent), os.environ.get("PYTHONPATH", "")])}
    rng, kills, runs = random.Random(3), 0, 0

    def launch(tear_at: int) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-c", DRIVER, str(config_path), str(resumed), str(tear_at)], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    # killed while writing a row: the 2nd row of the first run (the 3rd of the next, long profile)
    for tear_at in TEARS:
        process = launch(tear_at)
        process.wait(timeout=600)
        runs += 1
        assert process.returncode == -signal.SIGKILL, process.stderr.read().decode()[-2000:]
        kills += 1
        tail = (resumed / "results.jsonl").read_bytes()
        assert not tail.endswith(b"\n")  # the torn half row is really there
    # killed at random moments of a job (startup, prefill, decoding, report)
    for _ in range(RANDOM_KILLS):
        process = launch(0)
        time.sleep(rng.uniform(2.0, 12.0))
        runs += 1
        if process.poll() is None:
            process.send_signal(signal.SIGKILL)
            kills += 1
        process.wait(timeout=600)
    process = launch(0)
    assert process.wait(timeout=600) == 0, process.stderr.read().decode()[-2000:]
    data = (resumed / "results.jsonl").read_bytes()
    lines = data.splitlines(keepends=True)
    assert all(line.endswith(b"\n") and json.loads(line) for line in lines)  # no torn row left
    cells = [json.loads(line)["cell"] for line in lines]
    assert len(cells) == len(set(cells)) == 9  # none duplicated
    assert canonical(resumed / "results.jsonl") == expected  # the same results, byte for byte
    print(f"runs {runs + 1}, kills {kills}")


def test_replica_shutdown_is_bounded_when_serve_hangs(capsys):
    """Ctrl-C on `serve --replicas`: a serve.delete that never returns does not keep the process up."""
    import threading

    from tokensift.serve.replicas import APP_NAME, delete_app

    released = threading.Event()

    class StuckServe:
        def delete(self, name):
            assert name == APP_NAME
            released.wait(30)

    class Serve:
        deleted = []

        def delete(self, name):
            self.deleted.append(name)

    assert delete_app(Serve()) and Serve.deleted == [APP_NAME]
    assert not delete_app(StuckServe(), timeout=0.2)
    released.set()
    assert "did not stop within" in capsys.readouterr().err


def test_exit_watchdog_ends_a_process_whose_shutdown_hangs():
    """A thread that never ends (as a library's may) cannot keep a stopped server alive."""
    code = textwrap.dedent("""
        import threading
        from tokensift.serve.replicas import exit_watchdog
        exit_watchdog(0.5)
        threading.Thread(target=threading.Event().wait).start()  # non-daemon, never ends
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "shutdown took over" in done.stderr


def test_two_processes_publishing_the_same_conversion_keep_one_copy(tmp_path):
    """Parallel bench workers on a fresh machine convert the model at once; neither may fail."""
    from tokensift.models import private_partial, publish

    target = tmp_path / "model"
    for content in ("first", "second"):
        partial = private_partial(target).with_suffix(f".{content}")
        partial.mkdir()
        (partial / "config.json").write_text(content)
        publish(partial, target)
        assert not partial.exists()
    assert (target / "config.json").read_text() == "first"
