"""In-ViT pruning/merging on tiny random ViTs, and the real DINOv2-S loader (marked real)."""

import pytest
import torch

from tokensift.errors import TokensiftError
from tokensift.vision.selectors import selector_names
from tokensift.vision.vit import run_vit

torch.set_num_threads(2)


def _tiny(kind):
    import transformers as tf

    torch.manual_seed(0)
    common = dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=64,
                  image_size=56, patch_size=14)
    if kind == "dinov2":
        model = tf.Dinov2Model(tf.Dinov2Config(hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                                               mlp_ratio=2, image_size=56, patch_size=14))
    elif kind == "vit":
        model = tf.ViTModel(tf.ViTConfig(**common), add_pooling_layer=False)
    else:
        model = tf.CLIPVisionModel(tf.CLIPVisionConfig(**common, projection_dim=16))
    return model.eval()


@pytest.fixture(scope="module", params=["dinov2", "vit", "clip"])
def tiny(request):
    return _tiny(request.param), torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(1))


def test_keep_all_is_bit_identical(tiny):
    model, px = tiny
    with torch.no_grad():
        ref = model(pixel_values=px).last_hidden_state
    assert torch.equal(run_vit(model, px).last_hidden_state, ref)
    for name in ["fastervlm", "divprune", "uniform"]:
        assert torch.equal(run_vit(model, px, name, budget=16, layer=2).last_hidden_state, ref)


@pytest.mark.parametrize("name", selector_names())
def test_later_layers_run_on_fewer_tokens(tiny, name):
    model, px = tiny
    run = run_vit(model, px, name, budget=5, layer=2)
    assert run.tokens_per_layer[-1] == 5 and run.last_hidden_state.shape[1] == 6
    if name == "tome":
        assert run.tokens_per_layer == [16, 10, 5, 5, 5]
        assert torch.allclose(run.sizes.sum(1), torch.full((2,), 16.0))
    else:
        assert run.tokens_per_layer == [16, 16, 5, 5, 5]
    assert torch.equal(run.indices, torch.sort(run.indices, dim=1).values)


def test_proportional_attention_changes_output():
    """Merged tokens weigh by their size: same run with sizes forced to 1 differs."""
    from tokensift.vision import vit

    model = _tiny("dinov2")
    px = torch.randn(1, 3, 56, 56)
    merged = run_vit(model, px, "tome", budget=4, layer=4)
    original = vit._log_sizes
    vit._log_sizes = lambda sizes, p: None
    try:
        flat = run_vit(model, px, "tome", budget=4, layer=4)
    finally:
        vit._log_sizes = original
    assert not torch.allclose(merged.cls, flat.cls)


def test_errors_are_one_line():
    model = _tiny("dinov2")
    px = torch.randn(1, 3, 56, 56)
    for kwargs in [dict(budget=0), dict(ratio=1.0), dict(budget=17), dict(ratio=0.5, layer=9)]:
        with pytest.raises(TokensiftError) as err:
            run_vit(model, px, "divprune", **kwargs)
        assert "\n" not in str(err.value)
    with pytest.raises(TokensiftError, match="not a supported vision transformer"):
        run_vit(torch.nn.Linear(3, 3), px, "divprune", budget=3)


@pytest.mark.real
def test_loader_matches_onnxruntime_on_real_photos():
    from tokensift.vision.images import photos
    from tokensift.vision.loader import load_vit, onnx_hidden_states

    model = load_vit()
    _, px = photos()
    px = px[:6]
    with torch.no_grad():
        ours = model(pixel_values=px).last_hidden_state
    diff = (ours - onnx_hidden_states(px)).abs().max().item()
    assert ours.shape == (6, 257, 384)
    assert diff < 1e-4, diff


@pytest.mark.real
def test_real_vit_pruning_keeps_cls_close():
    from tokensift.vision.images import photos
    from tokensift.vision.loader import load_vit

    model = load_vit()
    _, px = photos()
    px = px[:2]
    full = run_vit(model, px)
    pruned = run_vit(model, px, "uniform", ratio=0.5, layer=6)
    cos = torch.nn.functional.cosine_similarity(full.cls, pruned.cls).min().item()
    assert pruned.tokens_per_layer[-1] == 128 and cos > 0.8


def test_output_side_selection_matches_run_vit_after_last_layer():
    from tokensift.vision.vit import encode, finish_encoded, select_encoded

    model = _tiny("dinov2")
    px = torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(2))
    enc = encode(model, px)
    assert torch.equal(finish_encoded(model, enc).cls, run_vit(model, px).cls)
    for name in ["vtc_cls", "visionzip", "mmtok"]:
        a, b = run_vit(model, px, name, budget=5), select_encoded(model, enc, name, budget=5)
        assert torch.equal(a.last_hidden_state, b.last_hidden_state) and torch.equal(a.indices, b.indices)
