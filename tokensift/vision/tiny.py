"""Tiny randomly initialised VLMs (LLaVA, LLaVA-NeXT, Qwen2-VL, Idefics3, SmolVLM) with inputs.

No pretrained VLM is reachable here; these prove the wrapper's mechanics (positions, masks,
caches, ``generate``) on every supported class. Not for quality claims.
"""

from __future__ import annotations

import torch

VOCAB = 128
IMAGE_TOKEN = 100
KINDS = ("llava", "llava_next", "qwen2_vl", "idefics3", "smolvlm")


def _text_config(**extra) -> dict:
    """A small decoder config shared by all tiny VLMs."""
    return dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False, **extra)


def tiny_llava():
    """A ``LlavaForConditionalGeneration`` with a 4-layer CLIP tower and Llama decoder."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                              image_size=56, patch_size=14, projection_dim=32)
    config = LlavaConfig(vision_config=vision, text_config=LlamaConfig(**_text_config()),
                         image_token_id=IMAGE_TOKEN, vision_feature_layer=-2,
                         vision_feature_select_strategy="default")
    return LlavaForConditionalGeneration(config)


def tiny_llava_next():
    """A ``LlavaNextForConditionalGeneration`` (any-resolution tiles + newline tokens)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaNextConfig, LlavaNextForConditionalGeneration

    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                              image_size=56, patch_size=14, projection_dim=32)
    config = LlavaNextConfig(vision_config=vision, text_config=LlamaConfig(**_text_config()),
                             image_token_index=IMAGE_TOKEN, image_grid_pinpoints=[[56, 56], [56, 112]],
                             vision_feature_layer=-2)
    return LlavaNextForConditionalGeneration(config)


def tiny_qwen2_vl():
    """A ``Qwen2VLForConditionalGeneration`` with multimodal rotary positions."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    text = _text_config(rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0})
    vision = dict(depth=2, embed_dim=32, hidden_size=64, num_heads=4, mlp_ratio=2, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2, in_channels=3)
    config = Qwen2VLConfig(text_config=text, vision_config=vision, image_token_id=IMAGE_TOKEN,
                           video_token_id=IMAGE_TOKEN + 1, vision_start_token_id=IMAGE_TOKEN + 2,
                           vision_end_token_id=IMAGE_TOKEN + 3)
    return Qwen2VLForConditionalGeneration(config)


def tiny_idefics3():
    """An ``Idefics3ForConditionalGeneration`` (the SmolVLM class) with pixel-shuffle connector."""
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration

    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  image_size=112, patch_size=14)
    config = Idefics3Config(vision_config=vision, text_config=_text_config(), image_token_id=IMAGE_TOKEN,
                            scale_factor=2)
    return Idefics3ForConditionalGeneration(config)


def tiny_smolvlm():
    """A ``SmolVLMForConditionalGeneration``."""
    from transformers import SmolVLMConfig, SmolVLMForConditionalGeneration

    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  image_size=112, patch_size=14)
    config = SmolVLMConfig(vision_config=vision, text_config=_text_config(), image_token_id=IMAGE_TOKEN,
                           scale_factor=2)
    return SmolVLMForConditionalGeneration(config)


def tiny_vlm(kind: str, seed: int = 0):
    """A tiny VLM of ``kind`` in eval mode (fp32, seeded)."""
    torch.manual_seed(seed)
    builders = {"llava": tiny_llava, "llava_next": tiny_llava_next, "qwen2_vl": tiny_qwen2_vl,
                "idefics3": tiny_idefics3, "smolvlm": tiny_smolvlm}
    model = builders[kind]()
    return model.eval()


def tiny_inputs(kind: str, batch: int = 1, seed: int = 0) -> dict:
    """``generate`` inputs for a tiny VLM: text, one image's placeholder tokens, pixels."""
    gen = torch.Generator().manual_seed(seed)
    def text(n):
        return torch.randint(3, 90, (batch, n), generator=gen)

    if kind == "llava":
        n_img, pixels = 16, {"pixel_values": torch.randn(batch, 3, 56, 56, generator=gen)}
    elif kind == "llava_next":
        n_img = 52  # base tile 4x4 + a 56x112 image as 4x8 features with 4 newline tokens
        pixels = {"pixel_values": torch.randn(batch, 3, 3, 56, 56, generator=gen),
                  "image_sizes": torch.tensor([[56, 112]] * batch)}
    elif kind == "qwen2_vl":
        n_img = 16
        pixels = {"pixel_values": torch.randn(batch * 64, 3 * 2 * 14 * 14, generator=gen),
                  "image_grid_thw": torch.tensor([[1, 8, 8]] * batch)}
    else:
        n_img, pixels = 16, {"pixel_values": torch.randn(batch, 1, 3, 112, 112, generator=gen)}
    image = torch.full((batch, n_img), IMAGE_TOKEN)
    if kind == "qwen2_vl":
        image = torch.cat([torch.full((batch, 1), IMAGE_TOKEN + 2), image, torch.full((batch, 1), IMAGE_TOKEN + 3)], 1)
    input_ids = torch.cat([text(3), image, text(6)], dim=1)
    inputs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), **pixels}
    if kind == "qwen2_vl":
        inputs["mm_token_type_ids"] = (input_ids == IMAGE_TOKEN).int()
    return inputs
