"""The tiered cache: a resident key sketch chooses, exact rows come from a second tier."""

import os

import pytest
import torch

from conftest import random_ids, tiny_llama
from tokensift.engine import make_cache
from tokensift.generate import left_pad
from tokensift.errors import TokensiftError
from tokensift.policies import build_policy
from tokensift.selection import read_stats
from tokensift.storage.sketch import KeySketch, rotation, unpack_slots


def tiered(k=24, **extra):
    return build_policy("tiered", k=k, n_sink=2, window=4, group=8, **extra)


def run_blocks(model, policy, blocks):
    cache = make_cache(model, policy)
    with torch.inference_mode():
        logits = torch.cat([model(b, past_key_values=cache, use_cache=True).logits for b in blocks], 1)
    return logits, cache


def decode_blocks(prompt_len=60, steps=6, seed=1):
    return [random_ids(prompt_len, seed=seed)] + [torch.tensor([[5 + i]]) for i in range(steps)]


# ----------------------------------------------------------------- exactness
@pytest.mark.parametrize("tier", ["file", "host"])
def test_k_at_least_length_equals_full_exactly(tiny_model, tier, tmp_path):
    blocks = decode_blocks() + [random_ids(7, seed=9)]  # a later multi-token block (a question) too
    full, _ = run_blocks(tiny_model, build_policy("full"), blocks)
    ours, cache = run_blocks(tiny_model, tiered(k=100, tier=tier, tier_dir=str(tmp_path)), blocks)
    assert torch.equal(full, ours)
    assert all(layer.sketches[0].count == 72 for layer in cache.selecting_layers)  # 73 tokens, groups of 8
    assert os.listdir(tmp_path) == []  # tier files are unlinked at once


def test_small_k_reads_only_chosen_rows_and_stays_close():
    model = tiny_llama()
    blocks = decode_blocks(prompt_len=120, steps=8)
    full, _ = run_blocks(model, build_policy("full"), blocks)
    ours, cache = run_blocks(model, tiered(k=40), blocks)
    stats = read_stats(cache)
    layers = len(cache.selecting_layers)
    assert stats["sparse"] == 8 * layers
    rows_per_head = stats["fetched_rows"] / stats["sparse"] / model.config.num_key_value_heads  # chosen per KV head
    assert rows_per_head < 60  # k=40 plus the few newest tokens not sketched yet, far below 128
    assert torch.equal(full[:, :120], ours[:, :120])  # prefill is exact
    assert (full[:, 120:].softmax(-1) - ours[:, 120:].softmax(-1)).abs().max() < 0.05


def test_refresh_reuses_a_selection_between_scorings():
    model = tiny_llama()
    blocks = decode_blocks(prompt_len=120, steps=7)
    every, every_cache = run_blocks(model, tiered(k=40), blocks)
    reused, cache = run_blocks(model, tiered(k=40, refresh=3), blocks)
    stats, layers = read_stats(cache), len(cache.selecting_layers)
    assert stats["sparse"] == 7 * layers and stats["reused"] == 4 * layers  # scored at steps 1, 4, 7
    assert torch.equal(every[:, :121], reused[:, :121])  # the first decode step scores in both
    assert (every.softmax(-1) - reused.softmax(-1)).abs().max() < 0.05
    assert "reused" not in read_stats(every_cache)


def test_batch_with_left_padding_equals_one_by_one():
    model = tiny_llama()
    prompts = [random_ids(n, seed=n)[0] for n in (90, 53)]
    ids, mask = left_pad([prompt.tolist() for prompt in prompts], pad_id=0)
    cache = make_cache(model, tiered(k=20))
    batched = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, past_key_values=cache)
    assert read_stats(cache)["sparse"] > 0
    for row, prompt in enumerate(prompts):
        alone = model.generate(prompt[None], max_new_tokens=6, do_sample=False, past_key_values=make_cache(model, tiered(k=20)))
        assert torch.equal(batched[row, 90:], alone[0, len(prompt):])


def test_rollback_keeps_exactly_the_accepted_path():
    from conftest import TinyTokenizer
    from tokensift.generate import generate
    from tokensift.speculative.engine import Speculator
    from tokensift.speculative.tree import CandidateTree

    model = tiny_llama()
    ids = random_ids(30, seed=5)[0].tolist()
    cache = make_cache(model, tiered(k=100))
    with torch.inference_mode():
        model.model(input_ids=torch.tensor([ids[:-1]]), past_key_values=cache, use_cache=True)
        greedy = generate(model, TinyTokenizer(), ids, max_new_tokens=4).token_ids[0]
        tree = CandidateTree(ids[-1])
        tree.add_path([7, 9], [0.5, 0.5], ["a", "a"])
        tree.add_path(greedy[:3], [0.9] * 3, ["b"] * 3)
        draft = tree.subtree(tree.ranked())
        path, _ = Speculator(model, "prompt_lookup", fixed_nodes=8).verify(draft, cache, 0.0, 1.0, torch.Generator())
    accepted = [draft.tokens[i] for i in path]
    assert accepted[1:] == greedy[:3]
    reference = make_cache(model, build_policy("full"))
    with torch.inference_mode():
        model.model(input_ids=torch.tensor([ids[:-1] + accepted]), past_key_values=reference, use_cache=True)
    for layer, ref in zip(cache.layers, reference.layers):
        assert layer.seen == ref.seen == 33
        torch.testing.assert_close(layer.keys, ref.keys, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(layer.values, ref.values, atol=1e-5, rtol=1e-4)
        assert torch.equal(layer.positions, ref.positions) and torch.equal(layer.ranks, ref.ranks)
        assert [s.count for s in layer.sketches] == [32]  # groups of 8 re-sketched after the rollback


def test_speculation_runs_over_the_tiered_cache():
    from conftest import TinyTokenizer
    from tokensift.generate import generate
    from tokensift.speculative.engine import Speculator

    model, tokenizer = tiny_llama(), TinyTokenizer()
    ids = random_ids(50, seed=2)[0].tolist() * 2  # repetitive: drafts get accepted
    plain = generate(model, tokenizer, ids, policy=tiered(k=200), max_new_tokens=20).token_ids[0]
    spec = Speculator(model, "prompt_lookup", fixed_nodes=4).generate(tokenizer, ids, policy=tiered(k=200), max_new_tokens=20)
    assert spec.token_ids == plain  # k above the length: exact, so lossless


# --------------------------------------------------------------- the sketch
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_sketch_round_trip_within_half_a_step(bits):
    torch.manual_seed(bits)
    keys = torch.randn(2, 3, 64, 16) * torch.linspace(0.1, 8, 16)  # channels of very different ranges
    sketch = KeySketch(bits, group=16, rotate=True)
    sketch.add(keys, keys)
    rotated = keys @ rotation(16, keys.device)
    step = sketch.scales.view().float().repeat_interleave(16, dim=2)  # per channel and group of 16 tokens
    error = (sketch.dequantized() - rotated).abs()
    assert bool((error <= step / 2 + 1e-3 * rotated.abs().amax()).all())
    # codes + fp16 scale/zero, 8-bit value means with an fp16 scale/zero per group; one spare group of room
    assert sketch.nbytes == 2 * 3 * (64 + 16) * 16 * bits // 8 + 2 * (2 * 3 * (4 + 1) * 16 * 2) + 2 * 3 * (4 + 1) * (16 + 4)
    means = keys.view(2, 3, 4, 16, 16).mean(3)
    step = (means.amax(-1, keepdim=True) - means.amin(-1, keepdim=True)) / 255
    assert bool(((sketch.value_means() - means).abs() <= step / 2 + 1e-3).all())


def test_rotation_is_orthogonal_and_keeps_scores():
    for dim in (16, 64, 24):  # Hadamard sizes and a non-power of two
        matrix = rotation(dim, "cpu")
        assert torch.allclose(matrix @ matrix.T, torch.eye(dim), atol=1e-5)
    torch.manual_seed(0)
    query, keys = torch.randn(1, 4, 1, 16), torch.randn(1, 2, 128, 16)
    exact = torch.einsum("bgrd,bgnd->bgrn", query.view(1, 2, 2, 16), keys).reshape(1, 4, 128)
    for rotate in (True, False):
        sketch = KeySketch(8, group=32, rotate=rotate)
        sketch.add(keys, keys)
        steps = sketch.scales.view().float()[0, :, :, None]  # [kv heads, groups, 1, dim]
        rotated_query = query.view(1, 2, 2, 16) @ (rotation(16, "cpu") if rotate else torch.eye(16))
        bound = (rotated_query[0].abs() @ (steps[:, 0, 0, :, None] / 2)).reshape(1, 4, 1)  # sum |q| * step / 2
        assert bool(((sketch.logits(query, 1.0) - exact).abs() <= bound + 1e-4).all())


def test_two_bit_sketch_ranks_like_exact_scores():
    torch.manual_seed(1)
    keys = torch.randn(1, 1, 1024, 64) + torch.randn(64) * 4  # per-channel offsets, as real keys have
    planted = torch.randint(0, 1024, (8,))
    query = torch.randn(1, 1, 1, 64)
    keys[0, 0, planted] += 3 * query[0, 0, 0]  # a few keys the query strongly matches
    sketch = KeySketch(2, group=128, rotate=True)
    sketch.add(keys, keys)
    chosen = set(sketch.logits(query, 1.0)[0, 0].topk(64).indices.tolist())
    assert set(planted.tolist()) <= chosen


# ------------------------------------------------------- fast paths against the plain ones
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("tokens", [16, 12, 6, 3])  # bytes read as int64, int32, int16, uint8
def test_unpack_slots_equals_shifting_each_byte(bits, tokens):
    torch.manual_seed(tokens)
    packed = torch.randint(0, 256, (2, 3, 5, 4, tokens), dtype=torch.uint8)
    views = [packed, packed[:, :, 1:4], packed[:, 1:]]  # slices of a larger buffer, as the sketch holds them
    for view in views:
        slots = unpack_slots(view, bits)
        assert slots.shape == (*view.shape[:-1], 8 // bits, tokens) and slots.dtype == torch.uint8
        for i in range(8 // bits):
            assert torch.equal(slots[..., i, :], (view >> (i * bits)) & ((1 << bits) - 1))


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("group", [8, 12, 128])
def test_sketch_logits_fast_path_equals_reference(bits, group):
    torch.manual_seed(bits * group)
    keys = torch.randn(1, 2, 4 * group, 32) + torch.randn(32) * 3
    sketch = KeySketch(bits, group=group, rotate=True)
    sketch.add(keys[:, :, : 3 * group], keys[:, :, : 3 * group])
    sketch.add(keys[:, :, 3 * group:], keys[:, :, 3 * group:])  # grown once: codes are a view of a buffer with spare room
    assert sketch.count == 4 * group
    for _ in range(3):
        query = torch.randn(1, 4, 1, 32)  # 2 query heads per KV head
        fast, reference = sketch.logits(query, 0.125), sketch.logits_reference(query, 0.125)
        torch.testing.assert_close(fast, reference, rtol=1e-5, atol=1e-5)
        for k in (group // 2, 2 * group):
            assert torch.equal(fast.topk(k).indices.sort().values, reference.topk(k).indices.sort().values)


def test_codes_are_the_token_packing_transposed_per_group():
    from tokensift.quant import pack_codes

    torch.manual_seed(0)
    keys = torch.randn(1, 2, 32, 16)
    sketch = KeySketch(2, group=8, rotate=False)
    sketch.add(keys, keys)
    levels = sketch.codes_as_float()  # through the byte table, token by token
    assert torch.equal(sketch.packed_tokens(), pack_codes(levels, 2))
    assert sketch.codes.view().shape == (1, 2, 4, 4, 8)  # [batch, heads, groups, bytes per token, group]


@pytest.mark.parametrize("settings", [
    {"k": 40, "n_sink": 2, "window": 4, "group": 8},
    {"k": 40, "n_sink": 0, "window": 0, "group": 8},
    {"k": 30, "n_sink": 3, "window": 12, "group": 8},  # the window reaches into sketched slots
    {"k": 40, "n_sink": 2, "window": 4, "group": 8, "refresh": 3},
    {"k": 100, "n_sink": 2, "window": 4, "group": 16},  # k above the sketched count at first: the general path
    {"k": 40, "n_sink": 2, "window": 4, "group": 8, "share": False},  # k per query head
    {"k": 40, "n_sink": 2, "window": 4, "group": 8, "tail": False},
])
def test_unpadded_fast_paths_equal_the_general_paths(monkeypatch, settings):
    from tokensift.policies.tiered import Tiered
    from tokensift.storage.tiered import TieredLayer

    model = tiny_llama()
    blocks = decode_blocks(prompt_len=120, steps=8)
    compared = []
    plain_choose = Tiered.choose

    def checking_choose(self, layer, query, scaling):
        fast, general = self.choose_unpadded(layer, query, scaling), self.choose_general(layer, query, scaling)
        if fast is not None:
            assert torch.equal(fast[0], general[0]) and torch.equal(fast[1], general[1])
            sketched = fast[2].shape[-1]  # the unread weights: the same at the sketched slots, 0 after
            assert torch.equal(fast[2], general[2][..., :sketched]) and not bool(general[2][..., sketched:].any())
            assert torch.equal(fast[3], general[3])
            compared.append(layer.seen)
        return plain_choose(self, layer, query, scaling)

    policy = build_policy("tiered", **settings)
    monkeypatch.setattr(Tiered, "choose_compiled", lambda self, layer, query, scaling: None)  # the PyTorch paths
    with monkeypatch.context() as patch:
        patch.setattr(Tiered, "choose", checking_choose)
        fast, fast_cache = run_blocks(model, policy, blocks)
    assert compared  # the fast choice ran and chose what the general path chooses
    with monkeypatch.context() as patch:  # every layer treated as padded: masks, per-row loops, reuse_read
        patch.setattr(TieredLayer, "padded", property(lambda self: True, lambda self, value: None), raising=False)
        general, general_cache = run_blocks(model, policy, blocks)
    assert torch.equal(fast, general)
    assert read_stats(fast_cache) == read_stats(general_cache)
    for ours, theirs in zip(fast_cache.selecting_layers, general_cache.selecting_layers):
        assert torch.equal(ours.sketches[0].codes.view(), theirs.sketches[0].codes.view())


def test_padding_is_tracked_through_rollback_and_reorder():
    model = tiny_llama()
    prompts = [random_ids(n, seed=n)[0] for n in (40, 33)]
    ids, mask = left_pad([prompt.tolist() for prompt in prompts], pad_id=0)
    cache = make_cache(model, tiered(k=20))
    with torch.inference_mode():
        model(ids, attention_mask=mask, past_key_values=cache, use_cache=True)
    layer = cache.selecting_layers[0]
    assert layer.padded
    layer.batch_select_indices(torch.tensor([0]))  # the unpadded row alone
    assert not layer.padded
    layer.batch_select_indices(torch.tensor([0, 0]))
    assert not layer.padded


# ------------------------------------------------------------------ accounting
def test_bytes_counted_are_the_bytes_held():
    model = tiny_llama()
    _, cache = run_blocks(model, tiered(k=24), decode_blocks(prompt_len=100, steps=3))
    for layer in cache.selecting_layers:
        held = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                for sketch in layer.sketches for t in (buffer.data for buffer in sketch.buffers)}
        held[layer.mask.untyped_storage().data_ptr()] = layer.mask.untyped_storage().nbytes()
        assert layer.kv_bytes == sum(held.values())
        assert layer.tier_bytes == layer.tier.keys.untyped_storage().nbytes() + layer.tier.values.untyped_storage().nbytes()
        assert layer.kv_bytes_full == 2 * layer.seen * 2 * 16 * 4  # batch 1, 2 KV heads, dim 16, fp32
    assert cache.kv_bytes == sum(layer.kv_bytes for layer in cache.selecting_layers)
    assert cache.tier_bytes == sum(layer.tier_bytes for layer in cache.selecting_layers)
    assert cache.kv_bytes_bf16 == cache.kv_bytes  # nothing full-precision is resident
    assert cache.kv_bytes_full_bf16 == cache.kv_bytes_full // 2


# ------------------------------------------------------------------ bad input
@pytest.mark.parametrize("params,message", [
    ({"bits": 3}, "bit width"),
    ({"bits": 1}, "bit width"),
    ({"k": 0}, "protected"),
    ({"k": -5}, "protected"),
    ({"group": 0}, "group"),
    ({"refresh": 0}, "refresh"),
    ({"window_bits": 3}, "bit width"),
    ({"window_group": 0}, "window_group"),
    ({"window_key_bits": 5}, "bit width"),
    ({"tier": "disk"}, "tier must be"),
    ({"tier_dir": "/proc/tokensift-tier"}, "cannot be written"),
    ({"base": "snapkv", "base_budget": 64}, "no base"),
])
def test_bad_settings_are_one_line_errors(params, message):
    with pytest.raises(TokensiftError, match=message) as error:
        build_policy("tiered", **{"k": 64, **params})
    assert "\n" not in str(error.value)


# --------------------------------------------------------- sliding-window layers
def test_gemma3_sliding_layers_at_full_precision_equal_full(tmp_path):
    from conftest import tiny_gemma3

    model = tiny_gemma3()
    blocks = decode_blocks(prompt_len=60, steps=5)
    full, _ = run_blocks(model, build_policy("full"), blocks)
    ours, cache = run_blocks(model, tiered(k=100, window_bits=0), blocks)
    assert torch.equal(full, ours)
    assert [type(layer).__name__ for layer in cache.layers] == ["SparseTieredLayer", "WindowLayer", "WindowLayer", "SparseTieredLayer"]


@pytest.mark.parametrize("bits", [4, 8])
def test_gemma3_quantized_windows_hold_codes_and_stay_close(bits):
    from conftest import tiny_gemma3
    from tokensift.storage.window import QuantizedWindowLayer

    model = tiny_gemma3()
    blocks = decode_blocks(prompt_len=60, steps=5)
    full, full_cache = run_blocks(model, build_policy("full"), blocks)
    ours, cache = run_blocks(model, tiered(k=100, window_bits=bits), blocks)
    assert torch.equal(full[:, :60], ours[:, :60])  # the prefill attends exactly
    assert (full.softmax(-1) - ours.softmax(-1)).abs().max() < (0.05 if bits == 4 else 0.01)
    windows = [layer for layer in cache.layers if isinstance(layer, QuantizedWindowLayer)]
    assert len(windows) == 2
    for layer in windows:
        assert layer.held_tokens == model.config.sliding_window - 1 and layer.keys.numel() == 0
        codes = layer.codes[0].packed.nbytes + layer.codes[1].packed.nbytes
        assert layer.kv_bytes == codes + 2 * 2 * (2 * 15 * 1 * 2)  # + fp16 scale/zero: 2 heads x 15 tokens x 1 group, K and V
        assert codes == 2 * 2 * 15 * 16 * bits // 8
    per_layer_full = 2 * 2 * 15 * 16 * 2  # K+V, 2 heads, 15 tokens, dim 16, bf16
    selecting_full = sum(layer.kv_bytes_full for layer in cache.selecting_layers) // 2
    assert cache.kv_bytes_full_bf16 == selecting_full + 2 * per_layer_full  # every layer counted
    assert cache.kv_bytes_bf16 == cache.kv_bytes


def test_gemma3_window_keys_at_more_bits_than_values():
    from conftest import tiny_gemma3
    from tokensift.storage.window import QuantizedWindowLayer

    model = tiny_gemma3()
    blocks = decode_blocks(prompt_len=60, steps=5)
    full, _ = run_blocks(model, build_policy("full"), blocks)
    four, _ = run_blocks(model, tiered(k=100, window_bits=4), blocks)
    ours, cache = run_blocks(model, tiered(k=100, window_bits=4, window_key_bits=8), blocks)
    assert (full.softmax(-1) - ours.softmax(-1)).abs().max() <= (full.softmax(-1) - four.softmax(-1)).abs().max()
    for layer in (layer for layer in cache.layers if isinstance(layer, QuantizedWindowLayer)):
        keys, values = layer.codes
        assert (keys.bits, values.bits) == (8, 4)
        assert keys.packed.nbytes == 2 * values.packed.nbytes == 2 * 15 * 16  # 2 heads x 15 tokens x dim 16, one byte each
        assert layer.kv_bytes == keys.packed.nbytes + values.packed.nbytes + 2 * 2 * (2 * 15 * 1 * 2)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_window_ring_compiled_equals_eager(monkeypatch, bits):
    """The ring's compiled dequantize (oldest first) and in-place quantize give the eager numbers."""
    from tokensift.storage.window import dequantize_grouped, dequantize_ring, in_order, quantize_grouped, replace_oldest

    torch.manual_seed(bits)
    rings = [quantize_grouped(torch.randn(2, 3, 20, 128) * 3, bits, 64) for _ in range(2)]
    rings[1].packed, rings[1].scale, rings[1].zero = rings[0].packed.clone(), rings[0].scale.clone(), rings[0].zero.clone()
    token = torch.randn(2, 3, 1, 128) * 5
    replace_oldest(rings[0], token, 7, 64)
    compiled = dequantize_ring(rings[0], 8, torch.float32)
    monkeypatch.setenv("TOKENSIFT_NATIVE", "0")
    replace_oldest(rings[1], token, 7, 64)
    assert all(torch.equal(a, b) for a, b in zip((rings[0].packed, rings[0].scale, rings[0].zero),
                                                 (rings[1].packed, rings[1].scale, rings[1].zero)))
    assert torch.equal(compiled, dequantize_ring(rings[1], 8, torch.float32))
    assert torch.equal(compiled, dequantize_grouped(in_order(rings[1], 8), torch.float32))
    assert torch.equal(compiled[:, :, -1:], dequantize_grouped(quantize_grouped(token, bits, 64), torch.float32))


def test_window_ring_keeps_padded_rows_in_order(monkeypatch):
    """A full quantized window is a ring (each decode token replaces the oldest in place); with
    left padding the masked slots must stay where transformers' mask expects them, so a padded
    batch decodes exactly as with the window re-concatenated every step."""
    from conftest import tiny_gemma3
    from tokensift.storage.window import QuantizedWindowLayer

    model = tiny_gemma3()
    ids, mask = left_pad([random_ids(n, seed=n)[0].tolist() for n in (20, 9)], pad_id=0)

    def decode(policy):
        cache, logits = make_cache(model, policy), []
        with torch.inference_mode():
            out = model(ids, attention_mask=mask, past_key_values=cache, use_cache=True)
            step_mask = mask
            for step in range(24):  # past the 16-token window: the ring wraps
                step_mask = torch.cat([step_mask, torch.ones(2, 1, dtype=step_mask.dtype)], 1)
                out = model(out.logits[:, -1:].argmax(-1), attention_mask=step_mask, past_key_values=cache, use_cache=True)
                logits.append(out.logits)
        return torch.cat(logits, 1), cache

    ring, cache = decode(tiered(k=100, window_bits=8, window_key_bits=8))
    starts = {layer.start for layer in cache.layers if isinstance(layer, QuantizedWindowLayer)}
    assert starts - {0}  # the ring moved
    monkeypatch.setattr(QuantizedWindowLayer, "replaces_oldest", lambda self, kept, fresh: False)
    concatenated, _ = decode(tiered(k=100, window_bits=8, window_key_bits=8))
    assert torch.equal(ring, concatenated)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_window_quantizer_round_trip_within_half_a_step(bits):
    from tokensift.storage.window import dequantize_grouped, quantize_grouped

    torch.manual_seed(bits)
    x = torch.randn(1, 2, 30, 64) * 3
    q = quantize_grouped(x, bits, 32)
    step = q.scale.float().repeat_interleave(32, dim=-1).reshape(1, 2, 30, 64)
    assert bool(((dequantize_grouped(q, torch.float32) - x).abs() <= step / 2 + 1e-3 * x.abs().max()).all())


# ------------------------------------------------------------ the unread tail
def test_extra_rows_are_exact_when_each_group_shares_one_value():
    """A group's extra row carries the logsumexp of its unread logits and its mean value: when every
    token of a group has the same value, reading some tokens plus those rows is full attention."""
    from tokensift.selection import attend_gathered

    torch.manual_seed(3)
    kv_heads, q_heads, tokens, group, dim = 2, 4, 64, 8, 16
    keys = torch.randn(1, kv_heads, tokens, dim)
    values = torch.randn(1, kv_heads, tokens // group, 1, dim).expand(-1, -1, -1, group, -1).reshape(1, kv_heads, tokens, dim)
    query = torch.randn(1, q_heads, 1, dim)
    full = torch.nn.functional.scaled_dot_product_attention(query, keys.repeat_interleave(2, 1), values.repeat_interleave(2, 1), scale=0.3)
    logits = (query @ keys.repeat_interleave(2, 1).transpose(-1, -2))[:, :, 0] * 0.3  # [1, q_heads, tokens]
    read = torch.stack([torch.randperm(tokens)[:20].sort().values for _ in range(q_heads)])[None]  # per query head
    unread = logits.scatter(-1, read, float("-inf")).view(1, q_heads, tokens // group, group).logsumexp(-1)
    means = values.view(1, kv_heads, tokens // group, group, dim).mean(3)
    head_of = torch.arange(q_heads) // 2
    gathered_keys = keys[0, head_of[:, None], read[0]][None]
    gathered_values = values[0, head_of[:, None], read[0]][None]
    ok = torch.ones(1, q_heads, 20, dtype=torch.bool)
    ours = attend_gathered(query, gathered_keys, gathered_values, ok, 0.3, extra=(unread, means))
    torch.testing.assert_close(ours[0, 0], full[0, :, 0], atol=1e-5, rtol=1e-5)
    without = attend_gathered(query, gathered_keys, gathered_values, ok, 0.3)
    assert (without[0, 0] - full[0, :, 0]).abs().max() > 1e-2  # dropping the unread tokens is not exact


def test_tail_brings_decoding_closer_to_full():
    model = tiny_llama()
    blocks = decode_blocks(prompt_len=240, steps=8)
    full, _ = run_blocks(model, build_policy("full"), blocks)

    def distance(policy):
        ours, _ = run_blocks(model, policy, blocks)
        return (full[:, 240:].softmax(-1) - ours[:, 240:].softmax(-1)).abs().sum(-1).mean()

    with_tail, without = distance(tiered(k=24, bits=8)), distance(tiered(k=24, bits=8, tail=False))
    assert with_tail < 0.5 * without


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("group", [8, 12, 128])
def test_compiled_scores_equal_the_eager_ones(monkeypatch, bits, group):
    from tokensift.storage import sketch_native

    if sketch_native.module() is None:
        pytest.skip("the sketch kernel cannot be built here (no C++ compiler or OpenMP)")
    torch.manual_seed(bits + group)
    keys = torch.randn(2, 3, 5 * group, 64) + torch.randn(64) * 3
    sketch = KeySketch(bits, group=group, rotate=True)
    sketch.add(keys[:1], keys[:1])
    query = torch.randn(1, 9, 1, 64)  # 3 query heads per KV head
    compiled = sketch.logits(query, 0.125)
    monkeypatch.setenv("TOKENSIFT_NATIVE", "0")
    eager = sketch.logits(query, 0.125)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-4)
    assert torch.equal(compiled.topk(group).indices.sort().values, eager.topk(group).indices.sort().values)


@pytest.mark.parametrize("settings", [
    {"k": 40},
    {"k": 40, "share": False},
    {"k": 30, "window": 12},  # the window reaches into sketched slots
    {"k": 24, "n_sink": 0, "window": 0, "bits": 4},
    {"k": 18, "n_sink": 6, "window": 10, "bits": 8},  # forced slots fill most of k
])
def test_compiled_choice_equals_the_pytorch_one(monkeypatch, settings):
    """One compiled call per layer and step (scores, weights, top k, unread group sums) chooses
    what :meth:`Tiered.choose_unpadded` chooses and sums the same unread weights."""
    from tokensift.policies.tiered import Tiered
    from tokensift.storage import sketch_native

    if sketch_native.module() is None:
        pytest.skip("the sketch kernel cannot be built here (no C++ compiler or OpenMP)")
    model = tiny_llama()
    compared = []
    plain_choose = Tiered.choose

    def checking_choose(self, layer, query, scaling):
        compiled = self.choose_compiled(layer, query, scaling)
        eager = self.choose_unpadded(layer, query, scaling)
        assert (compiled is None) == (eager is None)
        if compiled is not None:
            index, ok, weights, peak = eager
            assert torch.equal(compiled[0], index) and torch.equal(compiled[1], ok)
            torch.testing.assert_close(compiled[2], layer.unread_mass(weights), rtol=1e-5, atol=1e-6)
            assert torch.equal(compiled[3], peak)
            compared.append(layer.seen)
        return plain_choose(self, layer, query, scaling)

    settings = {"n_sink": 2, "window": 4, "group": 8} | settings
    monkeypatch.setattr(Tiered, "choose", checking_choose)
    run_blocks(model, build_policy("tiered", **settings), decode_blocks(prompt_len=120, steps=8))
    assert compared
