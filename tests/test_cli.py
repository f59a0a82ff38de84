"""CLI errors are one line on stderr with exit status 2; policies are listed."""

import pytest

from tokensift import cli
from tokensift.errors import TokensiftError
from tokensift.policies import build_policy


def run_cli(monkeypatch, capsys, *args):
    monkeypatch.setattr("sys.argv", ["tokensift", *args])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--policy", "nope"], "unknown policy 'nope'"),
        (["--policy", "snapkv", "--budget", "20"], "protected"),
        (["--policy", "snapkv", "--budget", "-5"], "protected"),
        (["--policy", "snapkv", "--ratio", "1.5"], "ratio must be between 0 and 1"),
        (["--policy", "snapkv", "--ratio", "0"], "ratio must be between 0 and 1"),
        (["--policy", "snapkv"], "needs exactly one of budget"),
        (["--policy", "full", "--budget", "100"], "takes no budget"),
        (["--policy", "snapkv", "--budget", "100", "--ratio", "0.5"], "not both"),
        (["--policy", "snapkv", "--budget", "100", "--set", "oops"], "key=value"),
        (["--policy", "snapkv", "--budget", "100", "--set", "nothing=1"], "has no parameter 'nothing'"),
        (["--policy", "snapkv", "--budget", "100", "--set", "kernel=big"], "must be int"),
        (["--weights", "int4"], "unknown --weights 'int4'"),
        (["--weights", "int8", "--exact-int8-head"], "already quantizes it"),
        (["--weights", "int8", "--speculate", "auto"], "not lossless over --weights int8"),
    ],
)
def test_generate_errors_are_one_line(monkeypatch, capsys, args, fragment):
    code, _, err = run_cli(monkeypatch, capsys, "generate", "--prompt", "hi", *args)
    assert code == 2
    assert fragment in err
    assert len(err.strip().splitlines()) == 1
    assert "Traceback" not in err


def test_missing_prompt_file(monkeypatch, capsys, tmp_path):
    code, _, err = run_cli(monkeypatch, capsys, "generate", "--prompt-file", str(tmp_path / "none.txt"))
    assert code == 2 and "prompt file not found" in err and len(err.strip().splitlines()) == 1


def test_missing_model_file(monkeypatch, capsys, tmp_path):
    code, _, err = run_cli(monkeypatch, capsys, "generate", "--prompt", "x", "--model", str(tmp_path / "m.gguf"))
    assert code == 2 and "model file not found" in err


def test_unknown_option_is_usage_error(monkeypatch, capsys):
    code, _, err = run_cli(monkeypatch, capsys, "generate", "--bogus")
    assert code == 2 and len(err.strip().splitlines()) == 1


def test_policies_lists_every_policy_with_paper(monkeypatch, capsys):
    monkeypatch.setattr("sys.argv", ["tokensift", "policies"])
    try:
        cli.main()
    except SystemExit as done:
        assert done.code in (0, None)
    out = capsys.readouterr().out
    for name in ("full", "random", "streaming_llm", "h2o", "tova", "snapkv", "knorm", "a2sf"):
        assert name in out
    assert "2404.14469" in out


def test_prompt_longer_than_context_is_clear_error(tokenizer):
    from conftest import tiny_llama
    from tokensift.generate import generate

    with pytest.raises(TokensiftError, match="exceeds the model's context of 1024"):
        generate(tiny_llama(), tokenizer, list(range(1, 1000)), max_new_tokens=64)


def test_build_policy_converts_strings():
    policy = build_policy("a2sf", budget="128", factor="0.9")
    assert policy.budget == 128 and policy.factor == 0.9


def test_package_exports_the_entry_points():
    import tokensift
    from tokensift.engine import make_cache
    from tokensift.models import load_model
    from tokensift.policies import build_policy

    assert (tokensift.load_model, tokensift.build_policy) == (load_model, build_policy)
    assert tokensift.make_cache is make_cache
    with pytest.raises(AttributeError):
        tokensift.no_such_thing  # noqa: B018


def test_lists_split_only_at_top_level_commas():
    assert cli.split_list("full, zipcache(hi_bits=8,lo_bits=4)@all,adakv(caote(snapkv))") == [
        "full", "zipcache(hi_bits=8,lo_bits=4)@all", "adakv(caote(snapkv))"]
    assert cli.split_list("64,128", int) == [64, 128]
