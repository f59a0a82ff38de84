"""Prepacked oneDNN linears: same results as the stock path up to float rounding, scoped to a block."""

import pytest
import torch
from conftest import random_ids, tiny_llama, tiny_qwen2

from tokensift.bench.runner import BenchConfig, run_bench
from tokensift.errors import TokensiftError
from tokensift.kernels import packed_linears, packing_available


@pytest.mark.parametrize("make", [tiny_llama, tiny_qwen2])  # qwen2: linears with bias
def test_packed_linears_match_stock_and_are_restored(make):
    model = make()
    if not packing_available(model):
        pytest.skip("this PyTorch build has no oneDNN")
    with torch.no_grad():
        for module in model.modules():
            if type(module) is torch.nn.Linear and module.bias is not None:
                module.bias.normal_()  # initialized to zero: make a dropped bias visible
    ids = random_ids(12, batch=2)
    with torch.inference_mode():
        stock = model(ids).logits
        with packed_linears(model) as active:
            assert active and all("forward" in vars(m) for m in model.modules() if type(m) is torch.nn.Linear)
            packed = model(ids).logits
            with packed_linears(model):  # nesting keeps the outer block's packing
                pass
            assert all("forward" in vars(m) for m in model.modules() if type(m) is torch.nn.Linear)
        assert not any("forward" in vars(m) for m in model.modules())
        again = model(ids).logits
    torch.testing.assert_close(packed, stock, atol=1e-4, rtol=1e-4)
    assert torch.equal(again, stock)


def test_packed_linears_off_or_unavailable_change_nothing():
    model = tiny_llama().to(torch.float64)
    with packed_linears(model) as active:
        assert not active and not any("forward" in vars(m) for m in model.modules())
    with packed_linears(tiny_llama(), enabled=False) as active:
        assert not active


def test_unknown_bench_kernels_is_an_error(tmp_path):
    config = BenchConfig.for_suite("quick", kernels="fast")
    with pytest.raises(TokensiftError, match="unknown kernels 'fast'"):
        run_bench(config, tmp_path)
