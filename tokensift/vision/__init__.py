"""Visual token selection: selectors, in-ViT pruning/merging, a VLM wrapper, the real DINOv2-S loader."""

from .selectors import Selection, get_selector, resolve_budget, selector_names
from .vit import VitRun, run_vit

__all__ = ["Selection", "VitRun", "get_selector", "resolve_budget", "run_vit", "selector_names"]
