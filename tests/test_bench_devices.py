"""The benchmark on any device and dtype: ``--device``/``--dtype`` on every command, rows that record
both, and nothing created off the model's device. Checks marked ``gpu`` rerun on CUDA when there is one."""

import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from tokensift import cli
from tokensift.bench.runner import BenchConfig, run_bench
from tokensift.models import load_model

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, CUDA])]


@pytest.fixture(scope="module")
def bench_folder(tmp_path_factory) -> str:
    """A tiny random Llama with the embedded tokenizer, saved as a model folder (the bench builds
    its prompts with the model's tokenizer)."""
    from tokensift.bench.tasks import default_tokenizer

    folder = tmp_path_factory.mktemp("tiny-bench-llama")
    tokenizer = default_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=4096)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def rows_of(folder) -> list[dict]:
    return [json.loads(line) for line in (folder / "results.jsonl").read_text().splitlines()]


def run_cli(monkeypatch, args: list[str]) -> None:
    monkeypatch.setattr("sys.argv", ["tokensift", *args])
    cli.main()


def test_cli_bench_in_bf16_on_cpu(monkeypatch, tmp_path, bench_folder):
    run_cli(monkeypatch, ["bench", "--model", bench_folder, "--dtype", "bfloat16", "--policies", "full,snapkv",
                          "--budgets", "64", "--lengths", "600", "--tasks", "niah,cost", "--samples", "1",
                          "--out", str(tmp_path)])
    rows = rows_of(tmp_path)
    assert {(r["task"], r["policy"]) for r in rows} == {("niah", "full"), ("niah", "snapkv"), ("cost", "full"), ("cost", "snapkv")}
    assert all(r["device"] == "cpu" and r["dtype"] == "bfloat16" for r in rows)
    for row in rows:  # a bf16 run holds bf16 tensors: its bytes are the bf16 figures
        assert row["kv_bytes"] == row["kv_bytes_bf16"] and row["kv_bytes_full"] == row["kv_bytes_full_bf16"]
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"


@pytest.mark.parametrize("command", [["bench"], ["compare", "kvpress"], ["serve"]])
@pytest.mark.parametrize("option, fragment", [(["--device", "tpu9"], "unknown device"), (["--dtype", "int3"], "unknown dtype")])
def test_every_model_command_takes_device_and_dtype(monkeypatch, capsys, tmp_path, command, option, fragment):
    with pytest.raises(SystemExit) as exit_info:
        run_cli(monkeypatch, [*command, *option, *(["--out", str(tmp_path / "out")] if command[0] != "serve" else [])])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and fragment in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_bench_creates_nothing_off_the_model_device(tmp_path, bench_folder):
    """Under ``torch.device("meta")`` a tensor made without ``device=`` has no data and cannot mix
    with the model's: every task of the bench (batched replays, sparse readers, the tiered second
    tier, mixed precision, decode timing) runs through, so each places what it creates."""
    model, tokenizer = load_model(bench_folder, dtype="bfloat16")
    config = BenchConfig.for_suite("quick", policies=["full", "snapkv", "tiered", "zipcache", "topk_attention"],
                                   budgets=[64], lengths=[600], samples=1, tasks=["niah", "fidelity", "cost"],
                                   cost_lengths=[600])
    with torch.device("meta"):
        run_bench(config, tmp_path, model=model, tokenizer=tokenizer)
    rows = rows_of(tmp_path)
    assert {r["task"] for r in rows} == {"niah", "fidelity", "cost"} and len(rows) == 15


def tiny_job(folder, out, device) -> list[dict]:
    config = BenchConfig.for_suite("quick", policies=["full", "snapkv", "tiered"], budgets=[64], lengths=[600],
                                   samples=1, tasks=["niah", "cost"], cost_lengths=[600], model=folder,
                                   device=device, dtype="bfloat16")
    run_bench(config, out)
    return rows_of(out)


@pytest.mark.gpu
@CUDA
def test_bench_on_cuda_holds_the_bytes_of_the_cpu_run(tmp_path, bench_folder):
    """The same tiny job on CUDA and on the CPU: rows say where they ran; bytes held do not depend on it."""
    rows = {device: tiny_job(bench_folder, tmp_path / device, device) for device in ("cpu", "cuda")}
    assert all(r["device"] == "cuda" and r["dtype"] == "bfloat16" for r in rows["cuda"]) and len(rows["cuda"]) == 6
    held = {device: {(r["task"], r["policy"]): r["kv_bytes"] for r in part} for device, part in rows.items()}
    assert held["cuda"] == held["cpu"] and held["cpu"][("niah", "snapkv")] < held["cpu"][("niah", "full")]


@pytest.mark.parametrize("device", DEVICES)
def test_speed_suites_run_on_the_device(tmp_path, bench_folder, device):
    """small-cache and sparse-speed (end to end) on ``device`` in bf16: rows record both."""
    from tokensift.bench.small_cache import run_small_cache
    from tokensift.bench.sparse_speed import run_sparse_speed

    run_small_cache(tmp_path / "small", model=bench_folder, lengths=[600], policies=["tiered", "snapkv(budget=64)"],
                    steps=3, device=device, dtype="bfloat16")
    run_sparse_speed(tmp_path / "sparse", model=bench_folder, lengths=[600], steps=3, rounds=1, kernel=False,
                     device=device, dtype="bfloat16")
    small, sparse = rows_of(tmp_path / "small"), rows_of(tmp_path / "sparse")
    assert {r["policy"] for r in small} == {"full", "tiered", "snapkv(budget=64)"}
    ran = [r for r in small + sparse if "device" in r]
    assert len(ran) == len(small) + len([r for r in sparse if r["section"] == "end_to_end"])
    assert all(r["device"].startswith(device) and r["dtype"] == "bfloat16" for r in ran)


@pytest.mark.gpu
@CUDA
def test_spec_suite_runs_on_cuda(tmp_path, bench_folder, monkeypatch):
    from tokensift.bench.spec_suite import run_spec_suite

    for name, value in (("TOKENSIFT_SPEC_PROMPTS", "1"), ("TOKENSIFT_SPEC_TOKENS", "8"), ("TOKENSIFT_SPEC_EXTRA", "")):
        monkeypatch.setenv(name, value)
    run_spec_suite(tmp_path, model=bench_folder, device="cuda", dtype="bfloat16")
    rows = rows_of(tmp_path)
    assert rows and all(r["device"].startswith("cuda") and r["dtype"] == "bfloat16" for r in rows)


def test_cost_measurement_creates_nothing_off_the_model_device():
    """The speculator's cost curve (drawn on the host for the same ids everywhere, then moved)."""
    from conftest import tiny_llama
    from tokensift.speculative import measure_cost

    model = tiny_llama()
    with torch.device("meta"):
        cost = measure_cost(model, context=64, sizes=(1, 2, 4), repeats=1)
    assert set(cost.body) >= {1, 2, 4}
