"""Bit packing, channel-separable tokenwise quantization, and the zipcache storage's byte count."""

import math

import pytest
import torch

from conftest import random_ids, tiny_llama
from tokensift.engine import make_cache
from tokensift.errors import TokensiftError
from tokensift.policies import build_policy
from tokensift.quant import (
    channel_scale,
    dequantize_channel_separable,
    pack_codes,
    quantize_channel_separable,
    quantize_tokens,
    unpack_codes,
)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_pack_roundtrip_and_size(bits):
    codes = torch.randint(0, 2**bits, (3, 5, 16), dtype=torch.uint8)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (3, 5, 16 * bits // 8)
    assert torch.equal(unpack_codes(packed, bits), codes)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_tokenwise_error_within_half_a_step(bits):
    x = torch.randn(2, 40, 32) * 3
    q = quantize_tokens(x, bits)
    step = (x.amax(-1, keepdim=True) - x.amin(-1, keepdim=True)) / (2**bits - 1)
    error = (q.dequantize() - x).abs()
    assert bool((error <= 0.5 * step * 1.01 + 2e-3 * x.abs().amax(-1, keepdim=True)).all())


def test_channel_separable_error_shrinks_with_bits():
    x = torch.randn(2, 64, 16) * torch.linspace(0.1, 10, 16)  # channels of very different scales
    scale = channel_scale(x)
    errors = [(dequantize_channel_separable(quantize_channel_separable(x, b, scale), scale) - x).abs().mean() for b in (2, 4, 8)]
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 0.02 * x.abs().mean()


@pytest.mark.parametrize("bad", [3, 1, 16])
def test_bad_bit_width_is_a_user_error(bad):
    with pytest.raises(TokensiftError):
        quantize_tokens(torch.randn(2, 8), bad)
    with pytest.raises(TokensiftError):
        build_policy("zipcache", hi_bits=bad)


def expected_zip_bytes(prompt: int, window: int, heads: int, dim: int, layers: int, ratio: float, hi: int, lo: int) -> int:
    """Count the packed storage from first principles (fp32 tail, fp16 scales)."""
    quantized = prompt - window
    n_hi = math.ceil(ratio * quantized)
    n_lo = quantized - n_hi
    tail = window * heads * dim * 4 * 2
    codes = heads * dim * (n_hi * hi + n_lo * lo) // 8 * 2
    token_params = heads * quantized * 2 * 2 * 2  # scale + zero, fp16, K and V
    channel_params = heads * dim * 2 * 2  # fp16, K and V
    return layers * (tail + codes + token_params + channel_params)


@pytest.mark.parametrize("hi,lo", [(4, 2), (8, 2), (8, 4)])
def test_zipcache_kv_bytes_is_the_packed_storage(hi, lo):
    model = tiny_llama()
    policy = build_policy("zipcache", n_sink=2, window=4, group=8, hi_bits=hi, lo_bits=lo, salient_ratio=0.3)
    cache = make_cache(model, policy)
    with torch.inference_mode():
        model(random_ids(60), past_key_values=cache, use_cache=True)
    assert cache.kv_bytes == expected_zip_bytes(60, 4, 2, 16, 3, 0.3, hi, lo)
    for layer in cache.selecting_layers:
        assert layer.keys is None and layer.packed
        assert all(k.packed.dtype == torch.uint8 for row in layer.blocks[0].rows for k, _ in row.parts)
    assert cache.kv_bytes < cache.kv_bytes_full / 3


def held_tensor_bytes(layer) -> int:
    total = layer.tail_keys.nbytes + layer.tail_values.nbytes
    for block in layer.blocks:
        for row in block.rows:
            total += row.key_scale.nbytes + row.value_scale.nbytes
            for k, v in row.parts:
                for q in (k, v):
                    total += q.packed.nbytes + q.scale.nbytes + q.zero.nbytes
    return total


def test_zipcache_window_stays_full_precision_and_blocks_flush_during_decode():
    model = tiny_llama()
    cache = make_cache(model, build_policy("zipcache", n_sink=2, window=4, group=8))
    full = make_cache(model, build_policy("full"))
    with torch.inference_mode():
        for c in (cache, full):
            model(random_ids(60), past_key_values=c, use_cache=True)
            for step in range(10):
                model(torch.tensor([[3 + step]]), past_key_values=c, use_cache=True)
    layer = cache.selecting_layers[0]
    assert [block.size for block in layer.blocks] == [56, 8]  # prompt, then 8 tokens that left the window
    assert layer.tail_keys.shape[2] == 6
    assert cache.kv_bytes == sum(held_tensor_bytes(layer) for layer in cache.selecting_layers)
    reference = full.selecting_layers[0]
    assert torch.equal(layer.tail_keys, reference.keys[:, :, -6:])  # recent tokens: exact
    layer.expand()
    order = layer.positions[..., None].expand(-1, -1, -1, layer.keys.shape[-1])
    original = reference.keys.gather(2, order)
    relative = (layer.keys - original).norm() / original.norm()
    assert 0 < relative < 0.35


def test_zipcache_8bit_close_to_full():
    model = tiny_llama()
    ids = random_ids(80, seed=4)
    logits = {}
    for name, params in (("full", {}), ("zipcache", dict(hi_bits=8, lo_bits=8, window=4, n_sink=2, group=8))):
        cache = make_cache(model, build_policy(name, **params))
        with torch.inference_mode():
            model(ids, past_key_values=cache, use_cache=True)
            logits[name] = model(torch.tensor([[7]]), past_key_values=cache, use_cache=True).logits
    assert (logits["full"] - logits["zipcache"]).abs().max() < 0.05
