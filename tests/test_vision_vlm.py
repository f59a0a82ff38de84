"""VLM wrapper on tiny random LLaVA, Qwen2-VL and Idefics3 (SmolVLM class) models."""

import pytest
import torch

from tokensift.errors import TokensiftError
from tokensift.vision.selectors import selector_names
from tokensift.vision.tiny import IMAGE_TOKEN, KINDS, tiny_inputs, tiny_vlm
from tokensift.vision.vlm import VisualTokenPruner

torch.set_num_threads(2)
GEN = dict(max_new_tokens=4, do_sample=False, output_scores=True, return_dict_in_generate=True)


@pytest.fixture(scope="module", params=KINDS)
def vlm(request):
    kind = request.param
    return kind, tiny_vlm(kind), tiny_inputs(kind)


def _positions(kind, model, inputs):
    """Original position ids of the full prompt, in the form ``generate`` accepts."""
    ids = inputs["input_ids"]
    text = torch.arange(ids.shape[1]).expand(ids.shape[0], -1)
    if kind != "qwen2_vl":
        return text
    keys = ("image_grid_thw", "attention_mask", "mm_token_type_ids")
    vision, _ = model.model.get_rope_index(ids, **{k: inputs[k] for k in keys})
    return torch.cat([text[None], vision], dim=0)


def _masking_hooks(model, n, keep1, keep2=None, layer2=None):
    """Reference: every LM layer attends only to kept keys (positions untouched)."""
    lm = getattr(model.model, "language_model", None) or model.model.text_model

    def hook_for(i):
        keep = keep2 if (keep2 is not None and i >= layer2) else keep1

        def hook(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            past = kwargs["past_key_values"].get_seq_length(i) if kwargs.get("past_key_values") is not None else 0
            kv = past + hidden.shape[1]
            keys = torch.cat([keep, torch.ones(keep.shape[0], max(0, kv - n), dtype=torch.bool)], 1)[:, :kv]
            qpos = torch.arange(past, kv)[:, None]
            kpos = torch.arange(kv)[None, :]
            mask = ((kpos <= qpos) & keys[:, None, :]) | (kpos == qpos)
            kwargs["attention_mask"] = mask[:, None]
            return args, kwargs

        return hook

    return [layer.register_forward_pre_hook(hook_for(i), with_kwargs=True) for i, layer in enumerate(lm.layers)]


def _reference(kind, model, inputs, keep1, keep2=None, layer2=None):
    handles = _masking_hooks(model, inputs["input_ids"].shape[1], keep1, keep2, layer2)
    try:
        return model.generate(**inputs, position_ids=_positions(kind, model, inputs), **GEN)
    finally:
        for h in handles:
            h.remove()


def _keep_mask(inputs, columns):
    keep = torch.zeros_like(inputs["input_ids"], dtype=torch.bool)
    return keep.scatter(1, columns, True)


def test_keep_all_is_bit_identical(vlm):
    kind, model, inputs = vlm
    ref = model.generate(**inputs, **GEN)
    n_vis = int((inputs["input_ids"][0] == IMAGE_TOKEN).sum())
    for method in ["todre", "visionzip", "random"]:
        out = VisualTokenPruner(model, method, budget=n_vis).generate(**inputs, **GEN)
        assert torch.equal(out.sequences, ref.sequences)
        assert all(torch.equal(a, b) for a, b in zip(out.scores, ref.scores))


def test_stage1_equals_masked_reference_with_true_positions(vlm):
    kind, model, inputs = vlm
    wrapper = VisualTokenPruner(model, "divprune", ratio=0.25)
    out = wrapper.generate(**inputs, **GEN)
    n_vis = wrapper.stats.visual_in
    assert n_vis == int((inputs["input_ids"][0] == IMAGE_TOKEN).sum()) and wrapper.stats.visual_kept == round(n_vis / 4)
    ref = _reference(kind, model, inputs, _keep_mask(inputs, wrapper.stats.kept_columns))
    assert torch.equal(out.sequences, ref.sequences)
    for a, b in zip(out.scores, ref.scores):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_stage2_equals_masked_reference(vlm):
    kind, model, inputs = vlm
    wrapper = VisualTokenPruner(model, "todre", ratio=0.5, stage2_layer=2, stage2_keep=0.25)
    out = wrapper.generate(**inputs, **GEN)
    stats = wrapper.stats
    k1 = round(stats.visual_in / 2)
    assert stats.visual_kept == k1 and stats.visual_kept_stage2 == round(k1 / 4)
    assert stats.stage2_dropped.shape == (1, k1 - round(k1 / 4))
    keep1 = _keep_mask(inputs, stats.kept_columns)
    keep2 = keep1.scatter(1, stats.stage2_dropped, False)
    ref = _reference(kind, model, inputs, keep1, keep2, layer2=2)
    assert torch.equal(out.sequences, ref.sequences)
    for a, b in zip(out.scores, ref.scores):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_stage2_really_caches_fewer_tokens(vlm):
    kind, model, inputs = vlm
    wrapper = VisualTokenPruner(model, "uniform", ratio=0.5, stage2_layer=1, stage2_keep=0.0)
    out = wrapper.generate(**inputs, max_new_tokens=2, do_sample=False, return_dict_in_generate=True)
    cache = out.past_key_values
    n, n_vis = inputs["input_ids"].shape[1], wrapper.stats.visual_in
    assert cache.get_seq_length(0) == n - (n_vis - round(n_vis / 2)) + 1
    assert cache.get_seq_length(1) == n - n_vis + 1


def test_generate_runs_with_every_selector(vlm):
    kind, model, inputs = vlm
    for method in selector_names():
        wrapper = VisualTokenPruner(model, method, budget=5)
        out = wrapper.generate(**inputs, max_new_tokens=2, do_sample=False)
        assert out.shape == (1, inputs["input_ids"].shape[1] + 2), method
        assert wrapper.stats.visual_kept == 5 and wrapper.stats.kept_indices.shape == (1, 5), method


def test_batch_of_two(vlm):
    kind, model, _ = vlm
    inputs = tiny_inputs(kind, batch=2, seed=3)
    wrapper = VisualTokenPruner(model, "mmtok", budget=6)
    out = wrapper.generate(**inputs, **GEN)
    ref = _reference(kind, model, inputs, _keep_mask(inputs, wrapper.stats.kept_columns))
    assert torch.equal(out.sequences, ref.sequences)


def test_bad_inputs_are_one_line_errors():
    model = tiny_vlm("llava")
    inputs = tiny_inputs("llava")
    cases = [
        lambda: VisualTokenPruner(torch.nn.Linear(2, 2)),
        lambda: VisualTokenPruner(model, "todre", budget=0).generate(**inputs, max_new_tokens=1),
        lambda: VisualTokenPruner(model, "todre", ratio=1.0).generate(**inputs, max_new_tokens=1),
        lambda: VisualTokenPruner(model, "nope"),
        lambda: VisualTokenPruner(model, "todre", ratio=0.5, stage2_layer=0),
    ]
    for case in cases:
        with pytest.raises(TokensiftError) as err:
            case()
        assert "\n" not in str(err.value)
