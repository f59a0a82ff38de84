"""W8A8 linears (``--weights int8``): close to fp32, each row independent of the others in its
batch, and refused by speculation (that is not enough to keep it lossless on a real model)."""

import pytest
import torch
from conftest import TinyTokenizer, random_ids, tiny_llama, tiny_qwen2

from tokensift.errors import TokensiftError
from tokensift.generate import generate
from tokensift.int8_linears import Int8Linear, observe_inputs, quantize_linears, smoothing_factors
from tokensift.speculative import CostModel, Speculator


def outlier_rows(count: int, features: int = 64, seed: int = 0) -> torch.Tensor:
    """Rows with two channels 30x larger than the rest, as in real LLM activations."""
    rows = torch.randn(count, features, generator=torch.Generator().manual_seed(seed))
    rows[:, [3, 17]] *= 30
    return rows


@pytest.mark.parametrize("smooth", [False, True])
def test_close_to_the_fp32_layer(smooth):
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 48, bias=True)
    x = outlier_rows(20)
    factors = smoothing_factors(x.abs().amax(0), linear.weight) if smooth else None
    quantized = Int8Linear(linear, factors)
    exact = linear(x)
    error = (quantized(x) - exact).norm() / exact.norm()
    assert error < (0.03 if smooth else 0.08), float(error)
    assert quantized.codes_t.dtype == torch.int8 and quantized.nbytes < linear.weight.nbytes / 3


def test_smoothing_lowers_the_error_on_outlier_channels():
    torch.manual_seed(1)
    linear = torch.nn.Linear(64, 64, bias=False)
    x = outlier_rows(50, seed=1)
    exact = linear(x)

    def error(layer):
        with torch.no_grad():
            return float((layer(x) - exact).norm() / exact.norm())

    assert error(Int8Linear(linear, smoothing_factors(x.abs().amax(0), linear.weight))) < error(Int8Linear(linear)) / 1.5


def test_each_row_is_independent_of_its_batch():
    """A row's output is bit-identical alone or among others: what makes speculation lossless."""
    torch.manual_seed(2)
    quantized = Int8Linear(torch.nn.Linear(64, 32))
    x = outlier_rows(9, seed=2)
    together = quantized(x)
    for i in range(9):
        assert torch.equal(quantized(x[i:i + 1]), together[i:i + 1])


@pytest.mark.parametrize("make", [tiny_llama, tiny_qwen2])
def test_quantized_model_generates_and_refuses_speculation(make):
    """Every linear layer is replaced (the output layer too); plain decoding runs; speculation over
    it is refused: on SmolLM2 it reproduced plain decoding in only 4 of 25 generations."""
    model, tokenizer = make(), TinyTokenizer()
    count = quantize_linears(model, random_ids(64, seed=9))
    assert count == sum(1 for m in model.modules() if isinstance(m, Int8Linear)) and count > 0
    assert isinstance(model.get_output_embeddings(), Int8Linear)
    assert not any(type(m) is torch.nn.Linear for m in model.modules())
    assert len(generate(model, tokenizer, random_ids(12, seed=1)[0].tolist(), max_new_tokens=6).token_ids[0]) == 6
    with pytest.raises(TokensiftError, match="not lossless over --weights int8"):
        Speculator(model, "auto", cost=CostModel.synthetic(0.02))


def test_calibration_sees_every_layer_and_groups_shared_inputs():
    model = tiny_llama()
    linears = {name: m for name, m in model.named_modules() if type(m) is torch.nn.Linear}
    maxima, groups = observe_inputs(model, random_ids(16, seed=3), linears)
    assert set(maxima) == set(linears)
    assert all(value.shape == (linears[name].in_features,) and (value >= 0).all() for name, value in maxima.items())
    assert sorted(name for group in groups for name in group) == sorted(linears)
    assert ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj", "model.layers.0.self_attn.v_proj"] in groups
    assert ["model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj"] in groups


def test_shared_quantizer_equals_separate_ones_and_lets_go_of_the_input():
    """q/k/v share one row quantization; the result equals quantizing for each layer alone."""
    from tokensift.int8_linears import RowQuantizer

    torch.manual_seed(3)
    layers = [torch.nn.Linear(64, n) for n in (64, 16, 16)]
    x = outlier_rows(5, seed=3)
    smooth = smoothing_factors(x.abs().amax(0), [m.weight for m in layers])
    shared = RowQuantizer(smooth, users=3)
    together = [Int8Linear(m, smooth, shared)(x) for m in layers]
    alone = [Int8Linear(m, smooth)(x) for m in layers]
    assert all(torch.equal(a, b) for a, b in zip(together, alone))
    assert shared._input is None  # released after its third reader


def test_missing_int8_kernels_are_a_one_line_error(monkeypatch):
    import tokensift.int8_linears as int8

    monkeypatch.setattr(int8, "int8_available", lambda model: False)
    with pytest.raises(TokensiftError, match="int8 weights need"):
        int8.quantize_linears(tiny_llama())


def test_cli_int8_weights_decode_like_the_api(monkeypatch, capsys):
    """``generate --weights int8`` quantizes the loaded model and decodes it plainly."""
    import json

    from tokensift import cli

    monkeypatch.setattr("tokensift.models.load_model", lambda *a, **k: (tiny_llama(), TinyTokenizer()))
    monkeypatch.setattr("tokensift.int8_linears.calibration_ids", lambda tokenizer, device: random_ids(48, seed=5))
    monkeypatch.setattr("sys.argv", ["tokensift", "generate", "--prompt", "5 6 7 8 5 6 7 8 5", "--max-new-tokens", "10",
                                     "--json", "--weights", "int8"])
    cli.main()
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["token_ids"]
    model = tiny_llama()
    quantize_linears(model, random_ids(48, seed=5))
    assert out == generate(model, TinyTokenizer(), [5, 6, 7, 8, 5, 6, 7, 8, 5], max_new_tokens=10).token_ids[0]
