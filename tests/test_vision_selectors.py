"""Visual-token selectors: exact budgets, sorted unique indices, determinism, errors."""

import pytest
import torch

from tokensift.errors import TokensiftError
from tokensift.vision.selectors import get_selector, resolve_budget, selector_names
from tokensift.vision.selectors.uniform import grid_indices

torch.set_num_threads(1)
ALL = selector_names()


def _tokens(b=2, n=64, d=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(b, n, d, generator=gen)


def test_registry_has_every_method():
    assert set(ALL) >= {"fastervlm", "vtc_cls", "divprune", "todre", "visionzip", "dart", "gprune",
                        "mmtok", "random", "uniform", "tome"}


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("k", [1, 7, 32, 64])
def test_exact_budget_sorted_unique(name, k):
    x = _tokens()
    scores = torch.rand(2, 64)
    sel = get_selector(name)(x, budget=k, scores=scores, layer_scores=scores[None].expand(3, -1, -1),
                             text=_tokens(2, 5, 16, seed=1))
    assert sel.indices.shape == (2, k)
    for row in sel.indices:
        assert torch.equal(row, torch.sort(row).values)
        assert len(set(row.tolist())) == k
        assert 0 <= row.min() and row.max() < 64


@pytest.mark.parametrize("name", ALL)
def test_deterministic(name):
    x = _tokens()
    a = get_selector(name)(x, ratio=0.25)
    b = get_selector(name)(x.clone(), ratio=0.25)
    assert torch.equal(a.indices, b.indices)


@pytest.mark.parametrize("name", [n for n in ALL if get_selector(n).merges])
def test_merged_sizes_sum_to_original_count(name):
    x = _tokens(n=100)
    sel = get_selector(name)(x, budget=10)
    assert sel.tokens.shape == (2, 10, 16)
    assert torch.allclose(sel.sizes.sum(dim=1), torch.full((2,), 100.0))


def test_keep_all_is_identity():
    x = _tokens()
    for name in ALL:
        sel = get_selector(name)(x, budget=64)
        kept, _ = sel.gather(x)
        assert torch.equal(sel.indices[0], torch.arange(64))
        assert torch.allclose(kept, x)


def test_fastervlm_takes_top_scores():
    x = _tokens()
    scores = torch.zeros(2, 64)
    scores[:, [3, 9, 40]] = 1.0
    assert get_selector("fastervlm")(x, budget=3, scores=scores).indices.tolist() == [[3, 9, 40]] * 2


def test_diversity_methods_spread_over_clusters():
    centers = torch.eye(4, 16) * 10
    x = centers.repeat_interleave(16, dim=0)[None] + 0.01 * _tokens(1, 64, 16)
    for name in ["divprune", "todre", "mmtok"]:
        idx = get_selector(name)(x, budget=4).indices[0]
        assert sorted((idx // 16).tolist()) == [0, 1, 2, 3], name


def test_uniform_grid_covers_the_image():
    idx = grid_indices(256, 64)
    rows, cols = idx // 16, idx % 16
    assert len(set(rows.tolist())) == 8 and len(set(cols.tolist())) == 8


def test_random_depends_on_seed():
    x = _tokens()
    a = get_selector("random", seed=1)(x, budget=8).indices
    b = get_selector("random", seed=2)(x, budget=8).indices
    assert not torch.equal(a, b)


@pytest.mark.parametrize("kwargs", [dict(budget=0), dict(budget=65), dict(ratio=1.0), dict(ratio=0.0),
                                    dict(ratio=1.5), dict(budget=3, ratio=0.5), dict()])
def test_bad_budgets_are_one_line_errors(kwargs):
    with pytest.raises(TokensiftError) as err:
        get_selector("divprune")(_tokens(), **kwargs)
    assert "\n" not in str(err.value)


def test_unknown_selector_and_bad_shape():
    with pytest.raises(TokensiftError, match="unknown visual selector"):
        get_selector("nope")
    with pytest.raises(TokensiftError, match="batch, tokens, dim"):
        get_selector("random")(torch.randn(64, 16), budget=3)


def test_resolve_budget():
    assert resolve_budget(256, ratio=0.11) == 28
    assert resolve_budget(256, budget=256) == 256
