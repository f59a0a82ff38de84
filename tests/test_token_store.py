"""The per-token store every selecting layer keeps its tokens in: append with spare room, gather,
truncate, stack, fork — and the layer operations built on it (adopt a fork or a stack, reset)."""

import torch
from conftest import random_ids, tiny_gemma3, tiny_llama

from tokensift.engine import make_cache
from tokensift.policies import build_policy
from tokensift.tokens import TokenStore


def store_of(length: int, batch: int = 1, heads: int = 2, dim: int = 4, start: float = 0.0) -> TokenStore:
    keys = start + torch.arange(batch * heads * length * dim, dtype=torch.float).reshape(batch, heads, length, dim)
    positions = torch.arange(length).expand(batch, heads, length).contiguous()
    valid = torch.ones(batch, heads, length, dtype=torch.bool)
    return TokenStore({"keys": keys, "positions": positions, "valid": valid}, {"score": keys[..., 0].clone()})


def test_append_writes_into_spare_room_then_copies_when_full():
    store = store_of(3)
    first = store.append("keys", torch.ones(1, 2, 1, 4), spare=2)
    buffer = store.buffers["keys"]
    assert buffer.shape[2] == 6 and first.data_ptr() == buffer.data_ptr()
    store.append("keys", torch.full((1, 2, 2, 4), 2.0))
    assert store.buffers["keys"] is buffer and store["keys"].shape[2] == 6
    store.append("keys", torch.full((1, 2, 1, 4), 3.0))  # no room left, no spare asked: a new tensor
    assert "keys" not in store.buffers and store["keys"].shape[2] == 7
    assert torch.equal(store["keys"][:, :, 3:, 0], torch.tensor([1.0, 2, 2, 3]).expand(1, 2, 4))


def test_gather_keeps_every_tensor_and_statistic_in_step():
    store = store_of(5)
    index = torch.tensor([[[0, 3], [4, 1]]])
    expected = store["keys"].gather(2, index[..., None].expand(-1, -1, -1, 4))
    store.gather(index)
    assert torch.equal(store["keys"], expected)
    assert torch.equal(store["positions"], index)
    assert torch.equal(store.statistics["score"], expected[..., 0])


def test_truncate_is_a_view_that_the_next_append_reuses():
    store = store_of(2)
    store.append("keys", torch.ones(1, 2, 3, 4), spare=4)
    buffer = store.buffers["keys"]
    store.truncate(3)
    assert store.length == 3 and store["keys"].data_ptr() == buffer.data_ptr()
    store.append("keys", torch.full((1, 2, 1, 4), 7.0))
    assert store.buffers["keys"] is buffer and float(store["keys"][0, 0, 3, 0]) == 7.0


def test_stack_pads_shorter_sequences_with_invalid_slots_on_either_side():
    short, long = store_of(2), store_of(4, start=100.0)
    del short.statistics["score"]  # a statistic one sequence lacks is zero there
    right = TokenStore.stack([short, long])
    assert right["keys"].shape == (2, 2, 4, 4)
    assert torch.equal(right["valid"][0, 0], torch.tensor([True, True, False, False]))
    assert torch.equal(right["keys"][1], long["keys"][0]) and torch.equal(right["keys"][0, :, :2], short["keys"][0])
    assert torch.equal(right.statistics["score"][0], torch.zeros(2, 4))
    left = TokenStore.stack([short, long], pad_left=True)
    assert torch.equal(left["valid"][0, 0], torch.tensor([False, False, True, True]))
    assert torch.equal(left["positions"][0, 0], torch.tensor([0, 0, 0, 1]))


def test_a_fork_shares_memory_and_neither_side_overwrites_the_other():
    store = store_of(2)
    store.append("keys", torch.ones(1, 2, 2, 4), spare=4)  # a buffer with spare room
    snapshot = store["keys"].clone()
    fork = store.fork()
    assert fork["keys"].data_ptr() == store["keys"].data_ptr() and not fork.buffers
    store.truncate(1)  # roll back below the shared length, then append: must not write in place
    store.append("keys", torch.full((1, 2, 1, 4), -5.0))
    fork.append("keys", torch.full((1, 2, 1, 4), 9.0))
    assert torch.equal(fork["keys"][:, :, :4], snapshot)
    assert float(store["keys"][0, 0, 1, 0]) == -5.0 and store.length == 2


def test_reset_keeps_the_layer_placement_and_forgets_the_tokens():
    model = tiny_gemma3()  # sliding-window layers too: a layer's depth is not its index
    cache = make_cache(model, build_policy("h2o", budget=16, window=4, n_sink=2))
    with torch.inference_mode():
        model(random_ids(30), past_key_values=cache, use_cache=True)
    layer = cache.selecting_layers[-1]
    depth, shared = (layer.depth, layer.depths), layer.shared
    assert depth[0] != layer.layer_idx and layer.token_state
    layer.reset()
    assert (layer.depth, layer.depths) == depth and layer.shared is shared
    assert layer.kept == 0 and layer.seen == 0 and not layer.token_state and not layer.is_initialized


def test_a_forked_cache_decodes_like_the_one_it_was_forked_from():
    """Two caches adopting forks of one prefilled cache decode the same tokens, and the
    prefilled cache's tensors are left as they were."""
    model = tiny_llama()
    prefilled = make_cache(model, build_policy("full"))
    with torch.inference_mode():
        model(random_ids(40), past_key_values=prefilled, use_cache=True)
        before = [layer.keys.clone() for layer in prefilled.selecting_layers]
        logits = []
        for _ in range(2):
            cache = make_cache(model, build_policy("full"))
            for source, target in zip(prefilled.selecting_layers, cache.selecting_layers):
                target.adopt(source.tokens().fork(), source.valid_seen, source.seen, compressed=False)
            steps = [model(torch.tensor([[7 + step]]), past_key_values=cache, use_cache=True).logits for step in range(5)]
            logits.append(torch.cat(steps))
    assert torch.equal(logits[0], logits[1])
    assert all(torch.equal(layer.keys, old) for layer, old in zip(prefilled.selecting_layers, before))
