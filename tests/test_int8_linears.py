"""W8A8 linears (``--weights int8``): close to fp32, each row independent of the others in its
batch, and speculative decoding of the quantized model equal to its own plain decoding."""

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
def test_speculation_equals_plain_decoding_of_the_quantized_model(make):
    model, tokenizer = make(), TinyTokenizer()
    fp32 = generate(model, tokenizer, random_ids(24, seed=4)[0].tolist(), max_new_tokens=16).token_ids[0]
    count = quantize_linears(model, random_ids(64, seed=9))
    assert count == sum(1 for m in model.modules() if isinstance(m, Int8Linear)) and count > 0
    assert isinstance(model.get_output_embeddings(), Int8Linear)
    speculator = Speculator(model, "auto", cost=CostModel.synthetic(0.02))
    steps = tokens = 0
    for seed in range(12):
        ids = random_ids(10 + seed, seed=seed)[0].tolist()
        ids = ids + ids[:6]  # a repeat, so drafts are accepted
        plain = generate(model, tokenizer, ids, max_new_tokens=14).token_ids[0]
        result = speculator.generate(tokenizer, ids, max_new_tokens=14)
        assert result.token_ids == plain
        steps, tokens = steps + result.steps, tokens + result.new_tokens
    assert tokens / steps > 1.1
    assert len(fp32) == 16  # the fp32 model generated before quantizing (its text may differ)


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


def test_cli_int8_weights_speculate_like_their_plain_decoding(monkeypatch, capsys):
    """``generate --weights int8``: plain and ``--speculate auto`` give the same tokens."""
    import json

    from tokensift import cli

    monkeypatch.setattr("tokensift.models.load_model", lambda *a, **k: (tiny_llama(), TinyTokenizer()))
    monkeypatch.setattr("tokensift.int8_linears.calibration_ids", lambda tokenizer, device: random_ids(48, seed=5))

    def run(*args):
        monkeypatch.setattr("sys.argv", ["tokensift", "generate", "--prompt", "5 6 7 8 5 6 7 8 5", "--max-new-tokens", "10",
                                         "--json", "--weights", "int8", *args])
        try:
            cli.main()
        except SystemExit as exit_info:
            assert exit_info.code in (0, None), capsys.readouterr().err
        return json.loads(capsys.readouterr().out.strip().splitlines()[-1])["token_ids"]

    assert run("--speculate", "auto", "--no-spec-warm") == run()
