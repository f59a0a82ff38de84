"""Visual token selection: selectors, in-ViT pruning/merging, a VLM wrapper, the real DINOv2-S loader.

>>> from tokensift.vision import get_selector, run_vit, VisualTokenPruner
>>> sel = get_selector("divprune")(tokens, ratio=0.11)          # tokens: [B, N, D]
>>> run = run_vit(vit, pixel_values, "tome", ratio=0.25)         # Dinov2Model / ViTModel / CLIPVisionModel
>>> VisualTokenPruner(vlm, "todre", ratio=0.1, stage2_layer=2, stage2_keep=0.0).generate(**inputs)
"""

from .selectors import Selection, get_selector, resolve_budget, selector_names
from .vit import VitRun, encode, run_vit, select_encoded
from .vlm import VisualTokenPruner

__all__ = ["Selection", "VisualTokenPruner", "VitRun", "encode", "get_selector", "resolve_budget", "run_vit",
           "select_encoded", "selector_names"]
