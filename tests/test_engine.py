"""The selecting cache on tiny random models: exactness, budgets, positions, bytes, batches."""

import pytest
import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from conftest import random_ids, tiny_llama
from tokensift.cache import SelectingLayer
from tokensift.engine import make_cache
from tokensift.generate import generate
from tokensift.policies import POLICIES, build_policy

EVICTING = sorted(name for name, cls in POLICIES.items() if cls.evicts)


def small_policy(name, budget=24, **extra):
    return build_policy(name, budget=budget, n_sink=2, window=4, **extra)


def test_full_is_bit_identical_to_plain_generate(tiny_model):
    ids = random_ids(50)
    reference = tiny_model.generate(ids, max_new_tokens=20, do_sample=False)
    cache = make_cache(tiny_model, build_policy("full"))
    ours = tiny_model.generate(ids, max_new_tokens=20, do_sample=False, past_key_values=cache)
    assert torch.equal(reference, ours)


def test_full_in_tokensift_loop_matches_plain_generate(tiny_model, tokenizer):
    ids = random_ids(40, seed=3)
    reference = tiny_model.generate(ids, max_new_tokens=15, do_sample=False)[0, 40:].tolist()
    result = generate(tiny_model, tokenizer, ids[0].tolist(), max_new_tokens=15)
    assert result.token_ids[0] == reference


def assert_held_budget(layer) -> None:
    """The layer holds its budget (per-layer budgets: pyramidkv; per-head ones: adakv, on average)."""
    budget = layer.policy.layer_budget(layer.layer_idx, layer.num_layers, layer.seen)
    assert layer.kept_valid_tokens() == budget
    if getattr(layer.policy, "layer_class", None) is None:  # storage variants lay tokens out their own way
        assert layer.keys.shape[2] == budget and layer.values.shape[2] == budget


@pytest.mark.parametrize("name", EVICTING)
def test_budget_holds_after_prefill_and_decode(tiny_model, name):
    cache = make_cache(tiny_model, small_policy(name))
    with torch.inference_mode():
        tiny_model(random_ids(60), past_key_values=cache, use_cache=True)
        for layer in cache.selecting_layers:
            assert_held_budget(layer)
        next_id = torch.tensor([[5]])
        for _ in range(7):
            tiny_model(next_id, past_key_values=cache, use_cache=True)
            for layer in cache.selecting_layers:
                assert_held_budget(layer)
                assert layer.seen == cache.get_seq_length()
    assert cache.get_seq_length() == 67


def test_interval_lets_cache_grow_then_cuts_back():
    model = tiny_llama()
    cache = make_cache(model, small_policy("h2o", interval=4))
    with torch.inference_mode():
        model(random_ids(60), past_key_values=cache, use_cache=True)
        sizes = []
        for _ in range(8):
            model(torch.tensor([[7]]), past_key_values=cache, use_cache=True)
            sizes.append(cache.selecting_layers[0].kept)
    assert sizes == [25, 26, 27, 24, 25, 26, 27, 24]


def test_heads_keep_different_tokens():
    model = tiny_llama()
    cache = make_cache(model, small_policy("knorm"))
    with torch.inference_mode():
        model(random_ids(80), past_key_values=cache, use_cache=True)
    positions = cache.selecting_layers[0].positions[0]
    assert not torch.equal(positions[0], positions[1])


def test_ratio_budget_keeps_fraction():
    model = tiny_llama()
    cache = make_cache(model, build_policy("snapkv", ratio=0.25, n_sink=2, window=4))
    with torch.inference_mode():
        model(random_ids(200), past_key_values=cache, use_cache=True)
    assert all(layer.kept == 50 for layer in cache.selecting_layers)


# ------------------------------------------------------------------ true positions
REFERENCE = "tokensift_reference_test"
_REFERENCE_MASKS: dict[int, torch.Tensor] = {}


def reference_attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
    """Full K/V, explicit per-head mask from ``_REFERENCE_MASKS[layer]`` ([B, kv_heads, T, T])."""
    groups = query.shape[1] // key.shape[1]
    mask = _REFERENCE_MASKS[module.layer_idx].repeat_interleave(groups, dim=1)
    out = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=mask, scale=scaling, enable_gqa=groups > 1
    )
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(REFERENCE, reference_attention)
AttentionMaskInterface.register(REFERENCE, sdpa_mask)


def history_masks(kept_per_block, block_ends, batch, heads, layers):
    """Per-layer ``[B, kv_heads, T, T]`` masks: each row sees what the cache held when it ran.

    ``kept_per_block[i][l]`` are the kept positions of layer ``l`` when block ``i`` (rows
    ``block_ends[i-1]:block_ends[i]``) was fed; ``None`` means the full causal past.
    """
    total = block_ends[-1]
    masks = []
    for layer_idx in range(layers):
        mask = torch.ones(batch, heads, total, total, dtype=torch.bool).tril()
        start = 0
        for kept, end in zip(kept_per_block, block_ends):
            if kept is not None:
                allowed = torch.zeros(batch, heads, total, dtype=torch.bool)
                allowed.scatter_(2, kept[layer_idx], True)
                allowed[:, :, start:] = True
                mask[:, :, start:end, :] &= allowed[:, :, None, :]
            start = end
        masks.append(mask)
    return masks


def reference_logits(model, ids: torch.Tensor, masks: list[torch.Tensor]) -> torch.Tensor:
    """Logits of a full-K/V forward where layer ``l`` attends under ``masks[l]``."""
    _REFERENCE_MASKS.clear()
    _REFERENCE_MASKS.update(enumerate(masks))
    previous = model.config._attn_implementation
    model.set_attn_implementation(REFERENCE)
    try:
        with torch.inference_mode():
            return model(ids).logits
    finally:
        model.set_attn_implementation(previous)


@pytest.mark.parametrize("name", ["snapkv", "h2o", "a2sf", "tova", "knorm", "streaming_llm", "random"])
def test_eviction_matches_masked_full_reference(tiny_model, name):
    """Prefill, evict, then a multi-token block and single decode steps: every logit equals a
    full-K/V run that hides exactly the evicted tokens (proves true positions and masks)."""
    cache = make_cache(tiny_model, small_policy(name))
    blocks = [random_ids(64, seed=1), random_ids(6, seed=2)] + [torch.tensor([[11 + i]]) for i in range(4)]
    kept_per_block, ends, outputs = [], [], []
    for block in blocks:
        layers = cache.selecting_layers
        kept_per_block.append([layer.positions.clone() for layer in layers] if layers[0].keys is not None else None)
        with torch.inference_mode():
            outputs.append(tiny_model(block, past_key_values=cache, use_cache=True).logits)
        ends.append((ends[-1] if ends else 0) + block.shape[1])
    batch, heads = cache.selecting_layers[0].positions.shape[:2]
    masks = history_masks(kept_per_block, ends, batch, heads, len(cache.selecting_layers))
    expected = reference_logits(tiny_model, torch.cat(blocks, 1), masks)
    ours = torch.cat(outputs, 1)
    assert (ours - expected).abs().max() < 1e-4


# ------------------------------------------------------------------------- bytes
def test_kv_bytes_is_sum_of_tensor_bytes_and_shrinks():
    model = tiny_llama()
    held = {}
    for budget in (16, 32, 48):
        cache = make_cache(model, small_policy("tova", budget=budget))
        with torch.inference_mode():
            model(random_ids(100), past_key_values=cache, use_cache=True)
        tensors = sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)
        assert cache.kv_bytes == tensors
        held[budget] = cache.kv_bytes
        full = make_cache(model, build_policy("full"))
        with torch.inference_mode():
            model(random_ids(100), past_key_values=full, use_cache=True)
        assert cache.kv_bytes_full == full.kv_bytes
    assert held[16] < held[32] < held[48]
    assert held[48] * 100 == pytest.approx(full.kv_bytes * 48, rel=1e-9)


# ---------------------------------------------------------- protected and padding
@pytest.mark.parametrize("name", EVICTING)
def test_protected_tokens_always_kept(name):
    model = tiny_llama()
    cache = make_cache(model, small_policy(name))
    with torch.inference_mode():
        model(random_ids(90), past_key_values=cache, use_cache=True)
        for _ in range(5):
            model(torch.tensor([[9]]), past_key_values=cache, use_cache=True)
    seen = cache.get_seq_length()
    for layer in cache.selecting_layers:
        for head in layer.positions[0]:
            kept = set(head.tolist())
            assert {0, 1} <= kept
            assert set(range(seen - 4, seen)) <= kept


@pytest.mark.parametrize("name", EVICTING)
def test_batch_with_left_padding_equals_one_by_one(tokenizer, name):
    model = tiny_llama()
    prompts = [random_ids(n, seed=n)[0].tolist() for n in (70, 45, 58)]
    batched = generate(model, tokenizer, prompts, policy=small_policy(name), max_new_tokens=10)
    for prompt, tokens in zip(prompts, batched.token_ids):
        alone = generate(model, tokenizer, prompt, policy=small_policy(name), max_new_tokens=10)
        assert alone.token_ids[0] == tokens


def test_padding_tokens_never_kept(tokenizer):
    model = tiny_llama()
    prompts = [random_ids(n, seed=n)[0].tolist() for n in (70, 30)]
    cache = make_cache(model, small_policy("h2o"))
    generate(model, tokenizer, prompts, policy=cache.policy, max_new_tokens=3, cache=cache)
    for layer in cache.selecting_layers:
        padding = 70 - 30
        short_row = layer.positions[1][layer.valid[1]]
        assert (short_row >= padding).all()
        assert int(layer.valid[1].sum(-1).min()) == 24  # 33 real tokens seen, budget 24: all slots real
        assert isinstance(layer, SelectingLayer)


def test_query_after_compression_is_not_seen_by_selection(tokenizer):
    model = tiny_llama()
    context = random_ids(80, seed=5)[0].tolist()
    question = [3, 4, 5]
    cache = make_cache(model, small_policy("snapkv"))
    generate(model, tokenizer, context, question=question, policy=cache.policy, max_new_tokens=1, cache=cache)
    assert cache.get_seq_length() == 83  # 80 context + 3 question; the first new token is not fed back yet
