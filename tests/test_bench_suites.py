"""The suite protocol (tokensift/bench/suite.py): every registered suite declares a Suite that the
``bench`` command runs, each report is rebuilt from the rows alone, and the command refuses, in
one line, an option the suite does not take."""

from __future__ import annotations

import inspect
import json
import shutil
from dataclasses import fields
from pathlib import Path

import pytest
from conftest import run_bench_cli as bench

from tokensift.bench.suite import BENCH_OPTIONS, REGISTRY, TEXT_SUITES, Suite, flag, get_suite, resolve
from tokensift.errors import TokensiftError

RESULTS = Path(__file__).resolve().parent.parent / "benchmarks" / "results"
VALUES = {"model": "x", "policies": "full", "budgets": "64", "ratios": "0.5", "lengths": "600", "tasks": "niah",
          "protocols": "query_aware", "samples": "1", "seed": "1", "full_only_tasks": "vt", "lm_budgets": "64",
          "workers": "2", "ray": None, "kernels": "stock"}  # ray: given alone (the CLI fills in "local")


def suite_or_skip(name: str) -> Suite:
    try:
        return get_suite(name)
    except TokensiftError as error:  # an optional suite without its packages
        pytest.skip(str(error))


@pytest.mark.parametrize("name", list(REGISTRY))
def test_every_registered_suite_implements_the_protocol(name):
    suite = suite_or_skip(name)
    assert isinstance(suite, Suite) and name in suite.names
    assert set(suite.options) <= set(BENCH_OPTIONS) | {"suite"} and set(suite.renames) <= set(suite.options)
    runner = resolve(suite.runner)
    parameters = inspect.signature(runner).parameters
    taken = {suite.renames.get(o, o) for o in suite.options if o not in suite.refusals} | {"device", "dtype"}
    named = {p for p, kind in parameters.items() if kind.kind is not kind.VAR_KEYWORD}
    if len(named) < len(parameters):  # the text suites: what is not the runner's own goes to BenchConfig
        from tokensift.bench.config import BenchConfig

        assert taken - named <= {f.name for f in fields(BenchConfig)}
    else:
        assert taken <= named, f"{suite.runner} does not take {taken - named}"
    inspect.signature(runner).bind(Path("out"), **{option: None for option in taken})
    inspect.signature(resolve(suite.reporter)).bind(Path("out"))


def test_the_text_suites_are_one_suite_named_as_the_configs():
    from tokensift.bench.config import SUITES

    assert tuple(SUITES) == TEXT_SUITES and all(get_suite(name) is get_suite("quick") for name in TEXT_SUITES)
    assert get_suite("quick").names == TEXT_SUITES


REFUSED = [(name, option) for name in REGISTRY if name not in TEXT_SUITES for option in BENCH_OPTIONS]


@pytest.mark.parametrize("name, option", REFUSED, ids=[f"{n} {flag(o)}" for n, o in REFUSED])
def test_cli_refuses_an_option_the_suite_does_not_take(monkeypatch, capsys, tmp_path, name, option):
    suite = suite_or_skip(name)
    if suite.takes(option):
        pytest.skip(f"{name} takes {flag(option)}")
    module, _, function = suite.runner.partition(":")
    monkeypatch.setattr(f"{module}.{function}", lambda *a, **k: pytest.fail("the suite ran"))
    given = [flag(option)] + ([VALUES[option]] if VALUES[option] is not None else [])
    assert bench(monkeypatch, "--suite", name, "--out", str(tmp_path / "out"), *given) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    if option in suite.refusals:
        assert suite.refusals[option] in err
    else:
        assert f"the {name} suite does not take {flag(option)}" in err
    assert not (tmp_path / "out").exists()


def test_cli_passes_the_options_a_suite_takes(monkeypatch):
    seen = {}
    monkeypatch.setattr("tokensift.bench.ttft_suite.run_ttft_suite", lambda out, **kw: seen.update(kw, out=out))
    assert bench(monkeypatch, "--suite", "ttft", "--policies", "full,gemfilter(layer=0.7,rows=16)", "--lengths", "512,1024",
                 "--seed", "3", "--out", "runs/x") == 0
    assert seen == {"out": Path("runs/x"), "prefills": ["full", "gemfilter(layer=0.7,rows=16)"], "lengths": [512, 1024],
                    "seed": 3, "device": "cpu", "dtype": "float32"}
    seen.clear()
    monkeypatch.setattr("tokensift.bench.runner.run_bench", lambda config, out, workers=1, ray=None: seen.update(
        config=config, workers=workers, ray=ray))
    assert bench(monkeypatch, "--suite", "standard", "--budgets", "64", "--kernels", "stock", "--workers", "2", "--ray") == 0
    config = seen["config"]
    assert (config.suite, config.budgets, config.kernels, config.seed) == ("standard", [64], "stock", 0)
    assert (seen["workers"], seen["ray"]) == (2, "local")


def test_a_suite_whose_module_is_missing_is_not_available(monkeypatch, capsys):
    monkeypatch.setitem(REGISTRY, "vision", "tokensift.bench.no_such_suite")
    assert bench(monkeypatch, "--suite", "vision") == 2
    err = capsys.readouterr().err
    assert err.strip() == "error: suite 'vision' is not available in this installation"


def copy_results(source: Path, out: Path, rows: str = "results.jsonl") -> Path:
    if not (source / rows).is_file():
        pytest.skip(f"no stored rows in {source}")
    out.mkdir()
    shutil.copy(source / rows, out / "results.jsonl")
    return out


@pytest.mark.parametrize("name, folder, rows, report", [
    ("standard", "small-cache/gemma3-8k", "results.jsonl", "report.md"),
    ("ttft", "ttft", "results.jsonl", "report.md"),
    ("small-cache", "small-cache", "speed_8k_results.jsonl", "speed_8k_report.md"),
])
def test_report_rebuilt_from_stored_rows_is_the_stored_report(tmp_path, name, folder, rows, report):
    """Reports that depend on the rows alone come back byte for byte from the stored rows."""
    out = copy_results(RESULTS / folder, tmp_path / "out", rows)
    get_suite(name).report(out)
    assert (out / "report.md").read_text() == (RESULTS / folder / report).read_text()


@pytest.mark.parametrize("name, folder", [("sparse-speed", "sparse_speed"), ("vision", "vision"), ("spec", "spec"),
                                          ("spec-fresh", "spec-fresh")])
def test_every_report_rebuilds_from_rows(tmp_path, name, folder):
    suite = suite_or_skip(name)
    out = copy_results(RESULTS / folder, tmp_path / "out")
    if name in ("spec", "spec-fresh"):
        with pytest.raises(TokensiftError, match="run.json"):
            suite.report(out)  # the loads before and after are in no row
        facts = {"load_before": [1.0, 1.0, 1.0], "load_after": [2.0, 2.0, 2.0], "threads": 2, "new_tokens": 128,
                 "per_category": 4}
        (out / "run.json").write_text(json.dumps(facts))
        if name == "spec":
            shutil.copy(RESULTS / folder / "cost_curve.json", out / "cost_curve.json")
    suite.report(out)
    text = (out / "report.md").read_text()
    assert text.startswith("# ") and "\n|---|" in text
