"""Seed eviction/precision methods: expressions, budgets, batches, storage, exactness."""

import pytest
import torch

from conftest import random_ids, tiny_llama
from test_engine import reference_logits
from tokensift.engine import make_cache
from tokensift.errors import TokensiftError
from tokensift.generate import generate
from tokensift.policies import build_policy
from tokensift.policies.caote import output_error
from tokensift.policies.pyramidkv import pyramid_budgets
from tokensift.policies.sepllm import is_separator_text

SETTINGS = dict(budget=24, n_sink=2, window=4)
EXPRESSIONS = [
    "vatp", "sepllm(separator_ids=5;9;13;17;21)", "fasa", "caote(h2o)", "caote(snapkv)", "caote(a2sf)",
    "graphkv(snapkv)", "pyramidkv(snapkv)", "adakv(snapkv)", "adakv(caote(snapkv))", "caote(graphkv(tova))",
    "graphkv(caote(snapkv))", "pyramidkv(adakv(h2o))", "adakv(pyramidkv(caote(a2sf)))", "pyramidkv(zipcache)",
    "zipcache",
]


@pytest.fixture(autouse=True)
def private_cache_dir(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("TOKENSIFT_CACHE", str(tmp_path_factory.getbasetemp() / "tokensift-cache"))


def policy(expression, **extra):
    return build_policy(expression, **{**SETTINGS, **extra})


def assert_budget(layer):
    budget = layer.policy.layer_budget(layer.layer_idx, layer.num_layers, layer.seen)
    assert layer.kept_valid_tokens() == budget
    assert int(layer.valid.sum(dim=(1, 2)).max()) == budget * layer.valid.shape[1]


# ------------------------------------------------------------------ expressions
def test_expression_hands_budget_settings_inward():
    p = build_policy("adakv(caote(snapkv(kernel=5)), floor=0.1)", budget=40, window=8)
    assert p.name == "adakv(caote(snapkv))" and p.floor == 0.1
    snap = p.inner.inner
    assert snap.kernel == 5 and (snap.budget, snap.window, p.inner.budget) == (40, 8, 40)
    assert p.needs_attention and p.layer_class.__name__ == "VarlenLayer"
    assert build_policy("snapkv", budget=40).budget == 40  # plain names still work
    assert p.params()["inner"]["name"] == "caote(snapkv)"


@pytest.mark.parametrize("bad", [
    "caote(nosuch)", "snapkv(h2o)", "caote(snapkv", "caote(snapkv))", "caote(snapkv, h2o)",
    "graphkv(snapkv, decay=)", "caote(full)", "adakv(zipcache)", "zipcache(hi_bits=3)", "",
])
def test_bad_expressions_are_user_errors(bad):
    with pytest.raises(TokensiftError):
        build_policy(bad, budget=40)


def test_wrapper_inner_from_set_string():
    p = build_policy("graphkv", budget=40, inner="caote(h2o)")
    assert p.name == "graphkv(caote(h2o))" and p.inner.inner.budget == 40


# ------------------------------------------------------------ decode budgets
@pytest.mark.parametrize("expression", EXPRESSIONS)
def test_budget_holds_after_prefill_and_decode(expression):
    model = tiny_llama()
    cache = make_cache(model, policy(expression))
    with torch.inference_mode():
        model(random_ids(60), past_key_values=cache, use_cache=True)
        for step in range(6):
            if cache.policy.layer_budget(0, 3, 60) is not None:
                for layer in cache.selecting_layers:
                    assert_budget(layer)
            model(torch.tensor([[5 + step]]), past_key_values=cache, use_cache=True)
    assert cache.get_seq_length() == 66
    assert cache.kv_bytes < cache.kv_bytes_full


@pytest.mark.parametrize("expression", EXPRESSIONS)
def test_batch_with_left_padding_equals_one_by_one(tokenizer, expression):
    model = tiny_llama()
    prompts = [random_ids(n, seed=n)[0].tolist() for n in (70, 45)]
    batched = generate(model, tokenizer, prompts, policy=policy(expression), max_new_tokens=6)
    for prompt, tokens in zip(prompts, batched.token_ids):
        alone = generate(model, tokenizer, prompt, policy=policy(expression), max_new_tokens=6)
        assert alone.token_ids[0] == tokens


# ----------------------------------------------------------------- exactness
def valid_history_masks(kept_per_block, block_ends, batch, heads, layers):
    """Like test_engine.history_masks, but only valid slots count (varlen heads have empty slots)."""
    total = block_ends[-1]
    masks = []
    for layer_idx in range(layers):
        mask = torch.ones(batch, heads, total, total, dtype=torch.bool).tril()
        start = 0
        for kept, end in zip(kept_per_block, block_ends):
            if kept is not None:
                positions, valid = kept[layer_idx]
                allowed = torch.zeros(batch, heads, total + 1, dtype=torch.bool)
                allowed.scatter_(2, positions.masked_fill(~valid, total), True)
                allowed = allowed[..., :total]
                allowed[:, :, start:] = True
                mask[:, :, start:end, :] &= allowed[:, :, None, :]
            start = end
        masks.append(mask)
    return masks


@pytest.mark.parametrize("expression", [
    "vatp", "sepllm(separator_ids=5;9;13;17;21)", "fasa", "caote(h2o)", "caote(snapkv)", "graphkv(snapkv)",
    "pyramidkv(snapkv)", "adakv(snapkv)", "adakv(caote(a2sf))",
])
def test_eviction_matches_masked_full_reference(tiny_model, expression):
    cache = make_cache(tiny_model, policy(expression))
    blocks = [random_ids(64, seed=1), random_ids(6, seed=2)] + [torch.tensor([[11 + i]]) for i in range(4)]
    kept_per_block, ends, outputs = [], [], []
    for block in blocks:
        layers = cache.selecting_layers
        started = layers[0].positions is not None and layers[0].positions.shape[-1] > 0
        kept_per_block.append([(layer.positions.clone(), layer.valid.clone()) for layer in layers] if started else None)
        with torch.inference_mode():
            outputs.append(tiny_model(block, past_key_values=cache, use_cache=True).logits)
        ends.append((ends[-1] if ends else 0) + block.shape[1])
    batch, heads = cache.selecting_layers[0].positions.shape[:2]
    masks = valid_history_masks(kept_per_block, ends, batch, heads, len(cache.selecting_layers))
    expected = reference_logits(tiny_model, torch.cat(blocks, 1), masks)
    assert (torch.cat(outputs, 1) - expected).abs().max() < 1e-4


# ------------------------------------------------------------------- methods
def test_caote_error_is_the_output_change_of_removing_a_token():
    weights = torch.softmax(torch.randn(1, 2, 9), dim=-1)
    values = torch.randn(1, 2, 9, 5)
    error = output_error(weights, values)
    output = torch.einsum("bhk,bhkd->bhd", weights, values)
    for j in range(9):
        rest = weights.clone()
        rest[..., j] = 0
        without = torch.einsum("bhk,bhkd->bhd", rest / rest.sum(-1, keepdim=True), values)
        assert torch.allclose((without - output).norm(dim=-1), error[..., j], atol=1e-5)


def test_pyramid_budgets_mean_and_shape():
    for mean, layers in ((24, 3), (512, 30), (100, 7)):
        budgets = pyramid_budgets(mean, layers, 20.0, 7)
        assert sum(budgets) == mean * layers
        assert budgets == sorted(budgets, reverse=True) and budgets[-1] >= 7
    p = policy("pyramidkv(snapkv)")
    assert [p.layer_budget(i, 3, 60) for i in range(3)] == pyramid_budgets(24, 3, 20.0, 7)


def test_adakv_heads_differ_sum_to_budget_and_memory_is_freed():
    model = tiny_llama(seed=1)
    cache = make_cache(model, policy("adakv(snapkv)", budget=12, floor=0.0))
    with torch.inference_mode():
        model(random_ids(80, batch=2), past_key_values=cache, use_cache=True)
    differ = False
    for layer in cache.selecting_layers:
        lengths = layer.head_lengths()
        assert (lengths.sum(-1) == 12 * 2).all()
        differ |= bool((lengths[:, 0] != lengths[:, 1]).any())
        assert layer.keys is None and layer.store_keys.shape == (2 * 12 * 2, 16)
        assert layer.kv_bytes == layer.store_keys.nbytes + layer.store_values.nbytes == 2 * 2 * 24 * 16 * 4
        assert layer.kept > 12  # the slot layout is padded to the longest head ...
        assert layer.kv_bytes < 2 * 2 * layer.kept * 16 * 4 * 2  # ... but storage holds only real tokens
    assert differ


def test_sepllm_keeps_separators_first():
    model = tiny_llama()
    ids = random_ids(80, seed=3)
    separators = set(ids[0, 10:60:7].tolist())
    sep_positions = {i for i, t in enumerate(ids[0].tolist()) if t in separators}
    expression = "sepllm(separator_ids=" + ";".join(map(str, sorted(separators))) + ")"
    assert 6 < len(sep_positions) < 30
    cache = make_cache(model, policy(expression, budget=len(sep_positions) + 8))
    with torch.inference_mode():
        model(ids, past_key_values=cache, use_cache=True)
    for layer in cache.selecting_layers:
        for head in layer.positions[0]:
            assert sep_positions <= set(head.tolist())
    small = make_cache(model, policy(expression, budget=10))
    with torch.inference_mode():
        model(ids, past_key_values=small, use_cache=True)
    for head in small.selecting_layers[0].positions[0].tolist():
        others = [p for p in head if p >= 2 and p < 76]
        assert set(others) <= sep_positions


def test_separator_texts():
    assert all(is_separator_text(t) for t in (".", " ,", "\n", "\n\n", "?!", "。", " ...", ":"))
    assert not any(is_separator_text(t) for t in ("a", " the", "", " ", "1.", "(", ")"))


def test_fasa_with_every_chunk_equals_unpooled_snapkv():
    model = tiny_llama()
    scores = {}
    for expression in ("fasa(chunks=8)", "snapkv(kernel=1)"):
        cache = make_cache(model, policy(expression))
        layer = cache.selecting_layers[1]
        layer.defer_eviction = True
        with torch.inference_mode():
            model(random_ids(60), past_key_values=cache, use_cache=True)
        scores[expression] = cache.policy.score(layer)
    assert torch.allclose(scores["fasa(chunks=8)"], scores["snapkv(kernel=1)"], atol=1e-5)


def test_fasa_calibration_is_cached(monkeypatch):
    from tokensift.policies import fasa

    model = tiny_llama()
    first = policy("fasa(chunks=3)")
    make_cache(model, first)
    assert first.dominant(0).shape == (4, 3)
    monkeypatch.setattr(fasa, "calibrate", lambda *a: (_ for _ in ()).throw(AssertionError("recalibrated")))
    second = policy("fasa(chunks=3)")
    make_cache(model, second)
    assert all(torch.equal(first.dominant(i), second.dominant(i)) for i in range(3))


def test_graphkv_without_decay_is_its_inner_ranking():
    model = tiny_llama()
    kept = {}
    for expression in ("graphkv(snapkv, decay=0)", "snapkv"):
        cache = make_cache(model, policy(expression))
        with torch.inference_mode():
            model(random_ids(70), past_key_values=cache, use_cache=True)
        kept[expression] = [set(h.tolist()) for layer in cache.selecting_layers for h in layer.positions[0]]
    assert kept["graphkv(snapkv, decay=0)"] == kept["snapkv"]


def test_graphkv_similarity_matches_the_full_matrix():
    from tokensift.policies.graphkv import similarity_to, unit_keys

    generator = torch.Generator().manual_seed(3)
    keys = unit_keys(torch.randn(2, 3, 300, 16, generator=generator), torch.ones(2, 3, 300, dtype=torch.bool))
    chosen = torch.rand(2, 3, 300, generator=generator) < 0.05
    chosen[1, 2] = False  # a head with nothing chosen
    full = torch.matmul(keys, keys.transpose(-1, -2)).masked_fill(~chosen[:, :, None, :], float("-inf")).amax(-1)
    assert torch.allclose(similarity_to(keys, chosen), full, atol=1e-6)
    assert torch.isinf(similarity_to(keys, chosen)[1, 2]).all()


def brute_column_sum(view, row_weights):
    """Whole-matrix softmax per query head, averaged over the group, weighted sum over rows."""
    query = view.query.float()
    keys = view.keys.float().repeat_interleave(view.groups, dim=1)
    logits = torch.matmul(query, keys.transpose(-1, -2)) * view.scaling
    visible = view.key_valid[:, :, None, :] & (view.key_positions[:, :, None, :] <= view.query_positions[None, None, :, None])
    visible = visible.repeat_interleave(view.groups, dim=1)
    probs = torch.softmax(logits.masked_fill(~visible, float("-inf")), -1).nan_to_num(0.0)
    batch, heads, rows, kv = probs.shape
    probs = probs.view(batch, heads // view.groups, view.groups, rows, kv).mean(2)
    weights = view.query_valid.float() * row_weights[None]
    return torch.einsum("bhrk,br->bhk", probs, weights)


@pytest.mark.parametrize("factor", [1.0, 0.99, 0.5])
def test_column_sum_matches_whole_matrix_with_unsorted_padded_keys(factor):
    from tokensift.scoring import AttentionView

    generator = torch.Generator().manual_seed(3)
    batch, kv_heads, groups, kv, rows, dim = 2, 2, 3, 700, 600, 8
    positions = torch.stack([torch.randperm(kv, generator=generator) for _ in range(batch * kv_heads)]).view(batch, kv_heads, kv)
    valid = torch.rand(batch, kv_heads, kv, generator=generator) > 0.1
    view = AttentionView(
        query=torch.randn(batch, kv_heads * groups, rows, dim, generator=generator),
        keys=torch.randn(batch, kv_heads, kv, dim, generator=generator),
        key_valid=valid, key_positions=positions,
        query_positions=torch.arange(kv - rows, kv), query_valid=torch.rand(batch, rows, generator=generator) > 0.2,
        scaling=dim**-0.5,
    )
    weights = factor ** torch.arange(rows - 1, -1, -1, dtype=torch.float32)
    expected = brute_column_sum(view, weights)
    got = view.column_sum(row_weights=None if factor == 1.0 else weights)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)


def test_column_sum_skips_only_keys_no_row_can_see():
    """Causal prefill: a chunk of early rows never reads later keys, so they are not computed."""
    from tokensift.scoring import AttentionView

    n = 600
    view = AttentionView(
        query=torch.randn(1, 3, n, 8), keys=torch.randn(1, 1, n, 8), key_valid=torch.ones(1, 1, n, dtype=torch.bool),
        key_positions=torch.arange(n).view(1, 1, n), query_positions=torch.arange(n),
        query_valid=torch.ones(1, n, dtype=torch.bool), scaling=0.3,
    )
    assert view.reach(slice(0, 256)) == 256
    assert view.reach(slice(256, 512)) == 512
    torch.testing.assert_close(view.column_sum(), brute_column_sum(view, torch.ones(n)), atol=1e-6, rtol=1e-5)
