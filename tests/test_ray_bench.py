"""``tokensift bench --ray``: a suite's jobs on a local Ray (2 CPUs) give the rows of one process,
and a run killed mid-way resumes without duplicating a row."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from tokensift.bench.runner import BenchConfig, read_rows, run_bench

ray = pytest.importorskip("ray")  # the ray extra (requirements-ray.txt)

TIMING = {"wall_seconds_group", "machine"}  # row fields that describe the run (time, threads), not results
ARGS = dict(policies=["full", "snapkv", "tova"], budgets=[64], lengths=[600], samples=2,
            tasks=["niah", "vt", "niah_multikey", "ppl", "fidelity"])


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray with 2 CPUs for the module; its address for a second driver."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """A tiny random Llama with the embedded tokenizer, saved where Ray workers can load it."""
    from tokensift.bench.tasks import default_tokenizer

    tokenizer = default_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=8192)
    folder = tmp_path_factory.mktemp("ray_bench") / "model"
    LlamaForCausalLM(config).eval().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def make_config(folder: Path) -> BenchConfig:
    config = BenchConfig.for_suite("quick", model=str(folder), **ARGS)
    config.ppl_length = 700
    return config


@pytest.fixture(scope="module")
def sequential(tiny_folder, tmp_path_factory):
    """The rows of the same cells run in this process, by cell."""
    out = tmp_path_factory.mktemp("sequential")
    run_bench(make_config(tiny_folder), out)
    return {row["cell"]: row for row in read_rows(out / "results.jsonl")}


def comparable(row: dict) -> dict:
    return {key: value for key, value in row.items() if key not in TIMING}


def test_ray_rows_equal_the_sequential_rows(local_ray, tiny_folder, sequential, tmp_path):
    run_bench(make_config(tiny_folder), tmp_path, ray=local_ray)
    lines = (tmp_path / "results.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    assert len(rows) == len(sequential) == 15  # 5 tasks x (full, snapkv@64, tova@64)
    assert {row["cell"]: comparable(row) for row in rows} == {cell: comparable(row) for cell, row in sequential.items()}
    assert (tmp_path / "report.md").exists()


def test_killed_ray_run_resumes_without_duplicate_rows(local_ray, tiny_folder, sequential, tmp_path):
    """A second driver joins this module's Ray, is killed (SIGKILL) once its first rows are
    written, and the rerun completes the matrix: each cell once, the rows before the kill kept."""
    command = [str(Path(sys.executable).with_name("tokensift")), "bench", "--ray", local_ray, "--suite", "quick",
               "--model", str(tiny_folder), "--policies", ",".join(ARGS["policies"]), "--budgets", "64",
               "--lengths", "600", "--samples", "2", "--tasks", ",".join(ARGS["tasks"]), "--out", str(tmp_path)]
    # ppl_length is the quick suite's 2048 in the CLI run: kill before ppl, and compare without it
    results = tmp_path / "results.jsonl"
    driver = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.monotonic() + 240
    while not (results.exists() and read_rows(results)):
        assert driver.poll() is None, driver.stderr.read().decode()[-2000:]
        assert time.monotonic() < deadline, "no row within 240 s"
        time.sleep(0.02)
    os.killpg(driver.pid, signal.SIGKILL)
    driver.wait()
    before = results.read_bytes()
    killed = read_rows(results)
    assert 0 < len(killed) < 15, "the kill must land mid-run"
    print(f"rows when killed: {len(killed)} of 15")
    config = make_config(tiny_folder)
    config.ppl_length = 2048  # the CLI's
    run_bench(config, tmp_path, ray=local_ray)
    after = results.read_bytes()
    rows = [json.loads(line) for line in after.splitlines()]
    cells = [row["cell"] for row in rows]
    assert len(cells) == len(set(cells)) == 15
    intact = [line for line in before.splitlines(keepends=True) if line.endswith(b"\n")]
    assert after.startswith(b"".join(intact[:len(killed)]))  # rows written before the kill are kept
    same = {cell: comparable(row) for cell, row in sequential.items() if not cell.startswith("ppl|")}
    assert {row["cell"]: comparable(row) for row in rows if not row["cell"].startswith("ppl|")} == same


def run_cli(monkeypatch, capsys, *args):
    from tokensift import cli

    monkeypatch.setattr("sys.argv", ["tokensift", *args])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    return exit_info.value.code, capsys.readouterr().err


def test_bare_ray_means_a_local_ray_and_bad_input_is_one_line(monkeypatch, capsys, tmp_path):
    from tokensift.cli import fill_optional_values

    assert fill_optional_values(["bench", "--ray"]) == ["bench", "--ray", "local"]
    assert fill_optional_values(["bench", "--ray", "--samples", "2"]) == ["bench", "--ray", "local", "--samples", "2"]
    assert fill_optional_values(["bench", "--ray", "10.0.0.1:6379"]) == ["bench", "--ray", "10.0.0.1:6379"]
    for address, words in (("127.0.0.1:1", "no Ray cluster answers at 127.0.0.1:1"),
                           ("nonsense", "a Ray address is local, auto or HOST:PORT")):
        code, err = run_cli(monkeypatch, capsys, "bench", "--ray", address, "--out", str(tmp_path / "run"))
        assert code == 2 and words in err and err.count("\n") == 1
    monkeypatch.setitem(sys.modules, "ray", None)  # as if the ray extra were not installed
    code, err = run_cli(monkeypatch, capsys, "bench", "--ray", "--out", str(tmp_path / "run"))
    assert code == 2 and err == ("error: tokensift bench --ray needs Ray (ray is missing): "
                                 "pip install 'tokensift[ray]' (or pip install -r requirements-ray.txt)\n")
    assert not (tmp_path / "run").exists()  # nothing written
