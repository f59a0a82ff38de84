"""Query-aware sparse reading on tiny random models: exactness, selection cache, HISA, batches, composition."""

import pytest
import torch
from transformers import DynamicCache

from conftest import TinyTokenizer, random_ids, tiny_llama
from tokensift.engine import make_cache
from tokensift.errors import TokensiftError
from tokensift.generate import generate, left_pad
from tokensift.policies import POLICIES, build_policy
from tokensift.selection import gather_attend, read_stats
from tokensift.storage.sparse_layer import sparse_layer_class

SPARSE = sorted(name for name, cls in POLICIES.items() if getattr(cls, "reads_subset", False))
COMPOSABLE = [name for name in SPARSE if POLICIES[name].takes_base]  # readers that run over a base policy
CROSS_LAYER = {"tidaldecode", "lessismore"}


def sparse_policy(name, k=16, **extra):
    if name in CROSS_LAYER:
        extra = {"full_layers": 1, "reselect_layer": -1, **extra}
    if name == "hisa":
        extra = {"block": 8, **extra}
    return build_policy(name, k=k, n_sink=2, window=4, **extra)


def test_all_six_methods_registered_as_readers():
    assert set(SPARSE) >= {"tokenselect", "tidaldecode", "recycled_attention", "topk_attention", "lessismore", "hisa"}
    for name in SPARSE:
        cls = POLICIES[name]
        assert cls.reads_subset and not cls.evicts and cls.__doc__ and cls.paper


# ----------------------------------------------------------------- exactness
@pytest.mark.parametrize("name", SPARSE)
def test_k_at_least_cache_length_equals_full_generate(tiny_model, name):
    ids = random_ids(50)
    reference = tiny_model.generate(ids, max_new_tokens=12, do_sample=False)
    cache = make_cache(tiny_model, sparse_policy(name, k=64))  # 50 + 12 tokens <= 64
    ours = tiny_model.generate(ids, max_new_tokens=12, do_sample=False, past_key_values=cache)
    assert torch.equal(reference, ours)
    assert read_stats(cache).get("sparse", 0) == 0


@pytest.mark.parametrize("name", SPARSE)
def test_k_at_least_cache_length_equals_full_logits(name):
    model = tiny_llama()
    blocks = [random_ids(40, seed=1)] + [torch.tensor([[7 + i]]) for i in range(5)]
    logits = {}
    for label, policy in (("full", build_policy("full")), ("sparse", sparse_policy(name, k=45))):
        cache = make_cache(model, policy)
        with torch.inference_mode():
            logits[label] = torch.cat([model(b, past_key_values=cache, use_cache=True).logits for b in blocks], 1)
    assert torch.equal(logits["full"], logits["sparse"])


@pytest.mark.parametrize("name", SPARSE)
def test_small_k_reads_sparsely_and_stays_close(name):
    model = tiny_llama()
    ids = random_ids(80, seed=4)
    cache = make_cache(model, sparse_policy(name, k=24))
    out = model.generate(ids, max_new_tokens=8, do_sample=False, past_key_values=cache, output_logits=True,
                         return_dict_in_generate=True)
    assert read_stats(cache)["sparse"] > 0
    assert all(layer.kept == layer.seen > 80 for layer in cache.selecting_layers)  # nothing evicted
    assert torch.isfinite(torch.stack(out.logits)).all()


def test_gather_attend_equals_masked_dense_attention():
    torch.manual_seed(0)
    batch, q_heads, kv_heads, length, dim = 2, 6, 2, 40, 8
    query = torch.randn(batch, q_heads, 1, dim)
    key, value = torch.randn(batch, kv_heads, length, dim), torch.randn(batch, kv_heads, length, dim)
    for heads in (1, kv_heads, q_heads):
        index = torch.stack([torch.randperm(length)[:10].sort().values for _ in range(batch * heads)]).view(batch, heads, 10)
        ok = torch.rand(batch, heads, 10) > 0.2
        ok[..., 0] = True
        ours = gather_attend(query, key, value, index, ok, 0.3)
        allowed = torch.zeros(batch, heads, length, dtype=torch.bool)
        allowed.scatter_(2, index, ok)
        mask = allowed.expand(batch, kv_heads, length) if heads == 1 else allowed
        mask = mask.repeat_interleave(q_heads // mask.shape[1], dim=1)[:, :, None]
        expected = torch.nn.functional.scaled_dot_product_attention(
            query, key.repeat_interleave(q_heads // kv_heads, 1), value.repeat_interleave(q_heads // kv_heads, 1),
            attn_mask=mask, scale=0.3)
        assert torch.allclose(ours, expected.transpose(1, 2), atol=1e-5)


# ------------------------------------------------------------ selection cache
def filled_layer(policy, length=64, seed=0, kv_heads=2, dim=8, batch=1):
    torch.manual_seed(seed)
    layer = sparse_layer_class(policy.layer_class)(0, 1, policy)
    layer.update(torch.randn(batch, kv_heads, length, dim), torch.randn(batch, kv_heads, length, dim))
    layer.mark_new_tokens(torch.ones(batch, length, dtype=torch.bool))
    return layer


def decode_step(layer, query, seed):
    torch.manual_seed(seed)
    batch, kv_heads, _, dim = layer.keys.shape
    key, value = layer.update(torch.randn(batch, kv_heads, 1, dim), torch.randn(batch, kv_heads, 1, dim))
    layer.mark_new_tokens(torch.ones(batch, 1, dtype=torch.bool))
    assert not layer.is_plain
    return layer.attend(query, key, value, torch.ones(batch, 1, dtype=torch.bool), 0.35)


def test_selection_cache_reuses_similar_queries_and_refreshes_on_change():
    policy = build_policy("tokenselect", k=16, n_sink=2, window=4, threshold=0.9)
    layer = filled_layer(policy)
    query = torch.randn(1, 4, 1, 8)
    decode_step(layer, query, 1)
    first = layer.state["tokenselect"]
    assert layer.state["sparse"] == {"fresh": 1, "sparse": 1}
    similar = query + 0.01 * torch.randn_like(query)
    out = decode_step(layer, similar, 2)
    assert layer.state["sparse"]["reused"] == 1 and layer.state["tokenselect"] is first
    # the reused read = the stored selection + the token added since
    read = torch.cat([first["positions"], torch.full((1, 2, 1), layer.seen - 1)], -1)
    allowed = torch.zeros(1, 2, layer.kept, dtype=torch.bool).scatter_(2, read, True)
    expected = torch.nn.functional.scaled_dot_product_attention(
        similar, layer.keys.repeat_interleave(2, 1), layer.values.repeat_interleave(2, 1),
        attn_mask=allowed.repeat_interleave(2, 1)[:, :, None], scale=0.35)
    assert torch.allclose(out, expected.transpose(1, 2), atol=1e-5)
    decode_step(layer, -query, 3)  # cosine -1: fresh selection, new reference
    assert layer.state["sparse"]["fresh"] == 2 and layer.state["tokenselect"] is not first
    assert torch.equal(layer.state["tokenselect"]["query"], (-query)[:, :, 0])


@pytest.mark.parametrize("threshold,fresh", [(-1.0, 1), (1.5, 6)])
def test_selection_cache_threshold_extremes_in_generate(threshold, fresh):
    model = tiny_llama()
    cache = make_cache(model, sparse_policy("tokenselect", threshold=threshold))
    model.generate(random_ids(60), max_new_tokens=7, do_sample=False, past_key_values=cache)
    for layer in cache.selecting_layers:  # 6 sparse decode steps after the prefill
        assert layer.state["sparse"].get("fresh", 0) == fresh
        assert layer.state["sparse"].get("reused", 0) == 6 - fresh


def test_recycled_attention_full_every_stride_steps():
    model = tiny_llama()
    cache = make_cache(model, sparse_policy("recycled_attention", stride=3))
    model.generate(random_ids(60), max_new_tokens=8, do_sample=False, past_key_values=cache)
    for layer in cache.selecting_layers:  # 7 decode steps: full at steps 0, 3, 6
        assert layer.state["sparse"]["fresh"] == 3 and layer.state["sparse"]["reused"] == 4


def test_cross_layer_selection_is_shared():
    model = tiny_llama()  # 3 layers: 0 dense, 1 selects, 2 reads layer 1's positions
    for name in sorted(CROSS_LAYER):
        cache = make_cache(model, sparse_policy(name))
        model.generate(random_ids(60), max_new_tokens=5, do_sample=False, past_key_values=cache)
        layers = cache.selecting_layers
        assert "sparse" not in layers[0].state or layers[0].state["sparse"].get("sparse", 0) == 0
        assert layers[1].state["sparse"]["fresh"] == 4 and layers[2].state["sparse"]["reused"] == 4
        saved = cache.shared[name]
        assert saved["positions"].shape == (1, 1, 16) and saved["seen"] == 64


# ----------------------------------------------------------------------- HISA
def test_hisa_equals_flat_topk_when_all_blocks_kept():
    for seed in range(5):
        policy = build_policy("hisa", k=20, n_sink=2, window=4, block=8, keep_blocks=100)
        layer = filled_layer(policy, length=101, seed=seed, batch=2)
        query = torch.randn(2, 4, 1, 8)
        hier, hier_ok = policy.select(layer, query, layer.keys, 0.35)
        flat, flat_ok = policy.flat_select(layer, query, layer.keys, 0.35)
        assert torch.equal(hier, flat) and torch.equal(hier_ok, flat_ok)


def test_hisa_few_blocks_selects_inside_kept_blocks():
    policy = build_policy("hisa", k=12, n_sink=2, window=4, block=8, keep_blocks=3)
    layer = filled_layer(policy, length=96, seed=3)
    index, ok = policy.select(layer, torch.randn(1, 4, 1, 8), layer.keys, 0.35)
    assert ok.all() and index.shape == (1, 2, 12)
    for head in index[0]:
        blocks = set((head // 8).tolist())
        assert {0, 11} <= blocks and len(blocks) <= 3  # sink block and window block always kept


# ---------------------------------------------------------- batches, composition
@pytest.mark.parametrize("name", SPARSE)
def test_batch_with_left_padding_inside_model_generate(name):
    model = tiny_llama()
    prompts = [random_ids(n, seed=n)[0] for n in (70, 45)]
    ids, mask = left_pad([prompt.tolist() for prompt in prompts], pad_id=0)
    cache = make_cache(model, sparse_policy(name, k=24))
    batched = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, past_key_values=cache)
    assert read_stats(cache)["sparse"] > 0
    # the short row never reads padding: equal to running it alone (sparse too, 45 > k)
    alone_cache = make_cache(model, sparse_policy(name, k=24))
    alone = model.generate(prompts[1][None], max_new_tokens=6, do_sample=False, past_key_values=alone_cache)
    if name != "tokenselect":  # tokenselect reuses only when every row's query is similar
        assert torch.equal(batched[1, 70:], alone[0, 45:])


@pytest.mark.parametrize("name", SPARSE)
def test_tokensift_generate_loop(tokenizer, name):
    model = tiny_llama()
    result = generate(model, tokenizer, random_ids(60)[0].tolist(), policy=sparse_policy(name), max_new_tokens=5)
    assert result.new_tokens == 5 and result.kv_tokens == 64


def test_reading_over_evicted_cache_composes():
    model = tiny_llama()
    ids = random_ids(70, seed=2)
    composed = build_policy("tokenselect", k=16, n_sink=2, window=4, base="snapkv", base_budget=40)
    assert composed.evicts and composed.needs_attention and composed.reads_subset
    cache = make_cache(model, composed)
    model.generate(ids, max_new_tokens=6, do_sample=False, past_key_values=cache)
    assert all(layer.kept == 40 for layer in cache.selecting_layers)
    assert read_stats(cache)["sparse"] > 0 and read_stats(cache)["fresh"] > 0
    # reading everything that survives eviction == the evicting policy alone
    for name in COMPOSABLE:
        snap = make_cache(model, build_policy("snapkv", budget=40, n_sink=2, window=4))
        wide = make_cache(model, sparse_policy(name, k=60, base="snapkv", base_budget=40))
        a = model.generate(ids, max_new_tokens=6, do_sample=False, past_key_values=snap)
        b = model.generate(ids, max_new_tokens=6, do_sample=False, past_key_values=wide)
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", COMPOSABLE)
def test_small_k_over_evicted_cache_runs(name):
    model = tiny_llama()
    cache = make_cache(model, sparse_policy(name, k=16, base="h2o", base_budget=40))
    out = model.generate(random_ids(70, seed=5), max_new_tokens=5, do_sample=False, past_key_values=cache)
    assert out.shape == (1, 75) and read_stats(cache)["sparse"] > 0


# ------------------------------------------------------------------ validation
@pytest.mark.parametrize("params,message", [
    ({}, "needs k=N"),
    ({"k": 10}, "protected"),
    ({"k": 64, "budget": 32}, "alias"),
    ({"ratio": 0.5}, "not ratio"),
    ({"k": 64, "base": "tokenselect"}, "base must be"),
    ({"k": 64, "base_budget": 100}, "need base"),
])
def test_validation_errors_are_one_line(params, message):
    with pytest.raises(TokensiftError, match=message) as error:
        build_policy("tokenselect", **params)
    assert "\n" not in str(error.value)


def test_budget_is_an_alias_of_k():
    policy = build_policy("topk_attention", budget=256)
    assert policy.k == 256 and policy.budget is None and policy.describe() == "topk_attention(k=256)"
    assert build_policy("tokenselect", k="128").k == 128


def test_reading_over_zipcache_storage():
    model = tiny_llama()
    ids = random_ids(90, seed=6)
    alone = make_cache(model, build_policy("zipcache", n_sink=2, window=4))
    expected = model.generate(ids, max_new_tokens=6, do_sample=False, past_key_values=alone)
    wide = make_cache(model, sparse_policy("tokenselect", k=120, base="zipcache"))
    assert torch.equal(model.generate(ids, max_new_tokens=6, do_sample=False, past_key_values=wide), expected)
    cache = make_cache(model, sparse_policy("tokenselect", k=24, base="zipcache"))
    model.generate(ids, max_new_tokens=6, do_sample=False, past_key_values=cache)
    assert read_stats(cache)["sparse"] > 0 and cache.kv_bytes == alone.kv_bytes  # packed storage, subset read


@pytest.mark.parametrize("policy", ["full", "topk_attention"])
def test_decode_appends_write_only_new_rows(policy):
    """Decode steps write into spare room after the prefill's copy: no reallocation of the past."""
    model = tiny_llama()
    cache = make_cache(model, build_policy("full") if policy == "full" else sparse_policy(policy, k=24))
    plain = DynamicCache(config=model.config)
    with torch.inference_mode():
        for target in (cache, plain):
            model(random_ids(60), past_key_values=target, use_cache=True)
        layer = cache.selecting_layers[0]
        assert layer.kv_bytes == layer.keys.nbytes * 2  # the prefill block is stored exactly
        model(torch.tensor([[5]]), past_key_values=cache, use_cache=True)
        buffer = layer.store.buffers["keys"]
        for step in range(10):
            model(torch.tensor([[6 + step]]), past_key_values=cache, use_cache=True)
        assert layer.store.buffers["keys"] is buffer and layer.keys.data_ptr() == buffer.data_ptr()
        assert layer.kept == 71 == layer.positions.shape[-1] and layer.kv_bytes == buffer.nbytes * 2
        for step in range(11):
            model(torch.tensor([[5 + step]]), past_key_values=plain, use_cache=True)
    assert torch.equal(plain.layers[0].keys, layer.keys)


def test_rollback_keeps_the_append_buffer_and_evicting_layers_stay_exact():
    model = tiny_llama()
    cache = make_cache(model, build_policy("full"))
    with torch.inference_mode():
        model(random_ids(30), past_key_values=cache, use_cache=True)
        model(torch.tensor([[5]]), past_key_values=cache, use_cache=True)
        layer = cache.selecting_layers[0]
        buffer = layer.store.buffers["keys"]
        model(torch.tensor([[6, 7, 8]]), past_key_values=cache, use_cache=True)
        cache.crop(31)
        model(torch.tensor([[9]]), past_key_values=cache, use_cache=True)
    assert layer.store.buffers["keys"] is buffer and layer.kept == 32
    evicting = make_cache(model, build_policy("h2o", budget=20, n_sink=2, window=4))
    with torch.inference_mode():
        model(random_ids(30), past_key_values=evicting, use_cache=True)
        model(torch.tensor([[5]]), past_key_values=evicting, use_cache=True)
    layer = evicting.selecting_layers[0]
    assert layer.kept == 20 and layer.kv_bytes == layer.keys.nbytes * 2 and not layer.store.buffers


def eager_copy_of(cache):
    """The same cache with metadata written at every step (the lazy path switched off)."""
    for layer in cache.selecting_layers:
        layer.lazy = False
    return cache


def test_waiting_metadata_equals_metadata_written_every_step():
    """A full-policy layer writes positions/ranks/valid/sink only when read; what it writes then
    equals what writing them at every step gives (left padding, decode steps, tree rollback)."""
    from tokensift.speculative import CandidateTree, Speculator

    model = tiny_llama()
    ids = random_ids(24, batch=2)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # left padding on the second row
    lazy, eager = make_cache(model, build_policy("full")), eager_copy_of(make_cache(model, build_policy("full")))
    assert all(layer.lazy for layer in lazy.selecting_layers)
    with torch.inference_mode():
        for cache in (lazy, eager):
            model.generate(ids, attention_mask=mask, max_new_tokens=7, do_sample=False, past_key_values=cache)
    layer = lazy.selecting_layers[0]
    assert layer._pending == 6  # the decode steps' metadata waited
    for name in ("positions", "ranks", "valid", "sink", "valid_seen"):
        for got, want in zip(lazy.selecting_layers, eager.selecting_layers):
            assert torch.equal(getattr(got, name), getattr(want, name)), name
    assert layer._pending == 0
    # one sequence: a tree whose accepted path is not a prefix of its nodes, then rollback
    single = [make_cache(model, build_policy("full")), eager_copy_of(make_cache(model, build_policy("full")))]
    prompt = random_ids(20, seed=3)[0].tolist()
    for cache in single:
        with torch.inference_mode():
            model.model(input_ids=torch.tensor([prompt[:-1]]), past_key_values=cache, use_cache=True)
            greedy = generate(model, TinyTokenizer(), prompt, max_new_tokens=3).token_ids[0]
            tree = CandidateTree(prompt[-1])
            tree.add_path([7, 9], [0.9, 0.9], ["a", "a"])
            tree.add_path(greedy[:2], [0.5, 0.5], ["b", "b"])
            path, _ = Speculator(model, "prompt_lookup", fixed_nodes=4).verify(
                tree.subtree(tree.ranked()), cache, 0.0, 1.0, torch.Generator())
        assert path[1:] == [2, 4]  # nodes 1 and 3 are the decoy: the kept nodes are moved
    for got, want in zip(*(c.selecting_layers for c in single)):
        assert got.seen == want.seen and torch.equal(got.keys, want.keys) and torch.equal(got.values, want.values)
        for name in ("positions", "ranks", "valid", "sink", "valid_seen"):
            assert torch.equal(getattr(got, name), getattr(want, name)), name


@pytest.mark.parametrize("name", COMPOSABLE)
@pytest.mark.parametrize("base", ["snapkv(kernel=5)", "zipcache", "adakv(h2o)"])
def test_base_policy_as_inner_expression_equals_base_keyword(name, base):
    """``reader(base, ...)`` is ``reader(..., base=base)``: one composition (a typed inner policy)."""
    size = "" if base == "zipcache" else ", base_budget=40"
    inner = build_policy(f"{name}({base}, k=16{size})", n_sink=2, window=4)
    extra = {} if base == "zipcache" else {"base_budget": 40}
    keyword = sparse_policy(name, base=base.split("(")[0], **extra)
    assert (inner.base, inner.base_budget, inner.layer_class) == (keyword.base, keyword.base_budget, keyword.layer_class)
    assert inner.inner.window == 4 and inner.inner.n_sink == 2 and inner.evicts == keyword.evicts
    if base == "snapkv(kernel=5)":
        assert inner.inner.kernel == 5 and keyword.inner.kernel == 7
    if base == "adakv(h2o)":
        assert inner.inner.inner.name == "h2o"


def test_inner_spelling_and_base_keyword_build_equal_policies():
    expression = build_policy("tokenselect(snapkv, k=256, base_budget=2048)")
    assert expression == build_policy("tokenselect", k=256, base="snapkv", base_budget=2048)
    assert expression == build_policy("tokenselect(snapkv(budget=2048), k=256)")
    assert expression.params() == build_policy("tokenselect", k=256, base="snapkv", base_budget=2048).params()


@pytest.mark.parametrize("expression, message", [
    ("tiered(snapkv, k=64)", "takes no base"),
    ("tokenselect(hisa, k=64)", "evicting or storage"),
    ("tokenselect(snapkv, k=64, base=h2o, base_budget=40)", "base policy once"),
])
def test_bad_inner_policies_of_readers(expression, message):
    with pytest.raises(TokensiftError, match=message):
        build_policy(expression)
