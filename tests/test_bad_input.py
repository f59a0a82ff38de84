"""Bad input sweep: every CLI command and the public functions, fed malformed input (unknown
names, wrong types, negative and huge numbers, empty prompts, prompts over the context limit,
missing or corrupt model/image/state files, malformed policy expressions, unusable output
folders). Each is one line on stderr, exit status 2, no traceback, nothing written half-way.
"""

from __future__ import annotations

import pytest

from conftest import TinyTokenizer, tiny_llama
from tokensift import cli
from tokensift.errors import TokensiftError
from tokensift.policies import build_policy

GEN = ["generate", "--prompt", "hi"]


def files(tmp_path):
    """Malformed files the cases point at."""
    corrupt_model = tmp_path / "corrupt.gguf"
    corrupt_model.write_bytes(b"GGUF\x00\x01garbage" * 8)
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"\xff\xfe\x00\x80" * 16)
    image = tmp_path / "broken.png"
    image.write_bytes(b"\x89PNG not really")
    state = tmp_path / "state.npz"
    state.write_bytes(b"not an npz")
    taken = tmp_path / "a_file"
    taken.write_text("x")
    empty_model_dir = tmp_path / "empty_model"
    empty_model_dir.mkdir()
    return {"model": corrupt_model, "binary": binary, "image": image, "state": state, "file": taken,
            "dir": empty_model_dir, "missing": tmp_path / "missing"}


CASES = [
    # policies and expressions
    (GEN + ["--policy", "nope"], "unknown policy"),
    (GEN + ["--policy", ""], "policy"),
    (GEN + ["--policy", "snapkv("], "missing ')'"),
    (GEN + ["--policy", "snapkv)", "--budget", "64"], "unexpected ')'"),
    (GEN + ["--policy", "adakv(caote(snapkv)", "--budget", "64"], "missing ')'"),
    (GEN + ["--policy", "snapkv(kernel=)", "--budget", "64"], "no value"),
    (GEN + ["--policy", "snapkv(h2o)", "--budget", "64"], "does not wrap"),
    (GEN + ["--policy", "adakv(snapkv, h2o)", "--budget", "64"], "one inner policy"),
    (GEN + ["--policy", "adakv(zipcache)", "--budget", "64"], "cannot combine"),
    (GEN + ["--policy", "snapkv", "--budget", "64", "--set", "kernel=big"], "must be int"),
    (GEN + ["--policy", "snapkv", "--budget", "64", "--set", "=3"], "key=value"),
    (GEN + ["--policy", "tokenselect", "--ratio", "0.5"], "takes k"),
    # numbers
    (GEN + ["--policy", "snapkv", "--budget", "-5"], "protected"),
    (GEN + ["--policy", "snapkv", "--budget", "0"], "protected"),
    (GEN + ["--policy", "snapkv", "--budget", "abc"], "budget"),
    (GEN + ["--policy", "snapkv", "--ratio", "1e308"], "ratio"),
    (GEN + ["--policy", "snapkv", "--ratio", "nan"], "ratio"),
    (GEN + ["--policy", "snapkv", "--ratio", "-0.5"], "ratio"),
    (GEN + ["--policy", "h2o", "--budget", "64", "--set", "interval=0"], "interval"),
    (GEN + ["--policy", "h2o", "--budget", "64", "--set", "window=-1"], "window"),
    (GEN + ["--max-new-tokens", "-1"], "max-new-tokens"),
    (GEN + ["--prefill-chunk", "0"], "prefill-chunk"),
    (GEN + ["--prefill-chunk", "-3"], "prefill-chunk"),
    (GEN + ["--top-p", "0"], "top-p"),
    (GEN + ["--top-p", "2"], "top-p"),
    (GEN + ["--temperature", "-1"], "temperature"),
    (GEN + ["--temperature", "inf"], "temperature"),
    (GEN + ["--speculate", "nope"], "unknown drafter"),
    (GEN + ["--speculate", "auto", "--tree-nodes", "-1"], "tree"),
    # prompts and files
    (["generate"], "exactly one of --prompt"),
    (["generate", "--prompt", "x", "--prompt-file", "{missing}"], "exactly one of --prompt"),
    (["generate", "--prompt-file", "{missing}"], "prompt file not found"),
    (["generate", "--prompt-file", "{dir}"], "prompt file not found"),
    (["generate", "--prompt-file", "{binary}"], "UTF-8"),
    (GEN + ["--model", "{missing}.gguf"], "model file not found"),
    (GEN + ["--model", "{model}"], "cannot read the model file"),
    (GEN + ["--model", "{dir}"], "{dir}"),
    # bench
    (["bench", "--suite", "nope", "--out", "{missing}"], "unknown suite"),
    (["bench", "--budgets", "a,b", "--out", "{missing}"], "cannot read the list"),
    (["bench", "--workers", "0", "--out", "{missing}"], "--workers"),
    (["bench", "--kernels", "nope", "--out", "{missing}"], "unknown kernels"),
    (["bench", "--samples", "-1", "--out", "{missing}"], "samples"),
    (["bench", "--lengths", "-5", "--out", "{missing}"], "length"),
    (["bench", "--budgets", "-5", "--out", "{missing}"], "budget"),
    (["bench", "--tasks", "nope", "--out", "{missing}"], "unknown task"),
    (["bench", "--protocols", "nope", "--out", "{missing}"], "protocol"),
    (["bench", "--policies", "nope", "--out", "{missing}"], "unknown policy"),
    (["bench", "--out", "{file}"], "{file}"),
    (["bench", "--out", "{file}/sub"], "{file}"),
    # compare, vision, unknown commands and options
    (["compare", "kvpress", "--budgets", "x", "--out", "{missing}"], "cannot read the list"),
    (["compare", "kvpress", "--length", "-1", "--out", "{missing}"], "length"),
    (["compare", "kvpress", "--samples", "0", "--out", "{missing}"], "samples"),
    (["compare", "kvpress", "--tasks", "nope", "--out", "{missing}"], "unknown task"),
    (["compare", "kvpress", "--presses", "nope", "--out", "{missing}"], "press"),
    (["vision", "--image", "{missing}"], "image"),
    (["vision", "--image", "{image}"], "image"),
    (["vision", "--image", "{image}", "--method", "nope"], "unknown visual selector"),
    (["nope"], "No such command"),
    (["generate", "--bogus"], "No such option"),
]


@pytest.mark.parametrize("args, fragment", CASES, ids=lambda value: " ".join(value) if isinstance(value, list) else None)
def test_cli_bad_input_is_one_line_exit_2_nothing_written(monkeypatch, capsys, tmp_path, args, fragment):
    paths = {name: str(path) for name, path in files(tmp_path).items()}
    args = [a.format(**paths) for a in args]
    monkeypatch.chdir(tmp_path)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    monkeypatch.setattr("sys.argv", ["tokensift", *args])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    assert len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err
    assert fragment.format(**paths).lower() in err.lower(), err
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # nothing written


# ------------------------------------------------------------------------ public functions
def test_public_functions_raise_one_line_tokensift_errors():
    from tokensift.generate import generate
    from tokensift.speculative import Speculator

    model, tokenizer = tiny_llama(), TinyTokenizer()
    calls = [
        lambda: generate(model, tokenizer, "", max_new_tokens=4),
        lambda: generate(model, tokenizer, [], max_new_tokens=4),
        lambda: generate(model, tokenizer, list(range(1, 1000)), max_new_tokens=64),
        lambda: generate(model, tokenizer, "1 2 3", max_new_tokens=-1),
        lambda: generate(model, tokenizer, "1 2 3", prefill_chunk=0),
        lambda: generate(model, tokenizer, "1 2 3", policy="nope"),
        lambda: generate(model, tokenizer, "1 2 3", policy=3),
        lambda: Speculator(model, "auto", fixed_nodes=-1),
        lambda: Speculator(model, "auto").generate(tokenizer, "", max_new_tokens=4),
        lambda: Speculator(model, "auto", fixed_nodes=4).generate(tokenizer, list(range(1, 1020)), max_new_tokens=8),
        lambda: build_policy("snapkv", budget="x"),
        lambda: build_policy("snapkv", budget=64, nothing=1),
        lambda: build_policy("((("),
        lambda: build_policy("snapkv", budget=64, ratio=0.5),
    ]
    for index, call in enumerate(calls):
        with pytest.raises(TokensiftError) as error:
            call()
        assert "\n" not in str(error.value), index
