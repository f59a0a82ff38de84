"""``tokensift vision`` command registered on a throwaway typer app."""

import json

import pytest
import typer
from typer.testing import CliRunner

from tokensift.vision.cli import register
from tokensift.vision.images import photo_paths


def _app():
    app = typer.Typer()
    register(app)

    @app.command("noop")
    def noop():  # a second command keeps typer in multi-command mode, like the main CLI
        pass

    return app


def test_list_methods():
    result = CliRunner().invoke(_app(), ["vision", "--list", "--json"])
    assert result.exit_code == 0
    names = {row["name"] for row in json.loads(result.output)}
    assert {"fastervlm", "todre", "tome", "uniform"} <= names


@pytest.mark.parametrize("args", [["--keep", "1.0"], ["--budget", "0"], ["--method", "nope"], ["--layer", "13"]])
def test_bad_inputs_exit_2_with_one_line(args):
    image = str(photo_paths()[0])
    result = CliRunner().invoke(_app(), ["vision", "--image", image, *args])
    assert result.exit_code == 2
    assert result.output.strip().startswith("error:") and len(result.output.strip().splitlines()) == 1


@pytest.mark.real
def test_json_run_on_a_real_photo():
    image = str(photo_paths()[1])
    result = CliRunner().invoke(_app(), ["vision", "--image", image, "--method", "divprune", "--keep", "0.25",
                                         "--layer", "6", "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    assert out["tokens_in"] == 256 and out["tokens_kept"] == 64 and len(out["kept_indices"]) == 64
    assert out["layer"] == 6 and 0.5 < out["cls_cosine"] <= 1.0 + 1e-6
    assert out["seconds"] > 0 and out["seconds_full"] > 0
