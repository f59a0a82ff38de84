"""``tokensift vision``: run the real DINOv2-S/14 on an image with a visual-token method."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from tokensift.errors import TokensiftError

N_LAYERS = 12
N_PATCHES = 256


def register(app: typer.Typer) -> None:
    """Add the ``vision`` command to the main typer app."""
    app.command("vision", help="Prune or merge visual tokens of the real DINOv2-S/14 on one image.")(vision)


def vision(
    image: Optional[Path] = typer.Option(None, "--image", help="PNG/JPEG image to encode."),
    method: str = typer.Option("fastervlm", "--method", help="Selector name (see --list)."),
    keep: Optional[float] = typer.Option(None, "--keep", help="Keep ratio in (0, 1) (default 0.25)."),
    budget: Optional[int] = typer.Option(None, "--budget", help="Number of patch tokens to keep."),
    layer: int = typer.Option(N_LAYERS, "--layer", help="Apply after this ViT layer (0..12; 12 = output)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
    list_methods: bool = typer.Option(False, "--list", help="List the methods and exit."),
    device: str = typer.Option("cpu", "--device", help="cpu (default), cuda, cuda:N, mps or auto."),
    dtype: str = typer.Option("float32", "--dtype", help="float32 (default), bfloat16 or float16."),
) -> None:
    """Run the method on the image and report tokens kept, [CLS] fidelity and time."""
    try:
        if list_methods:
            _print_methods(as_json)
            return
        result = run_on_image(image, method, keep, budget, layer, device, dtype)
    except TokensiftError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2)
    _print_result(result, as_json)


def run_on_image(image: Optional[Path], method: str, keep: Optional[float], budget: Optional[int],
                 layer: int, device=None, dtype=None) -> dict:
    """Full and pruned forwards of the real ViT on ``image`` (on ``device``, in ``dtype``): a JSON-ready dict."""
    import torch
    import torch.nn.functional as F

    from tokensift.devices import resolve_device, resolve_dtype

    from .images import load_image, to_pixels
    from .loader import load_vit
    from .selectors import get_selector, resolve_budget
    from .vit import run_vit

    device, dtype = resolve_device(device), resolve_dtype(dtype)
    if image is None:
        raise TokensiftError("give an image with --image PATH (or --list to see the methods)")
    if keep is None and budget is None:
        keep = 0.25
    selector = get_selector(method)
    resolve_budget(N_PATCHES, budget, keep)
    if not 0 <= layer <= N_LAYERS:
        raise TokensiftError(f"layer {layer} is out of range: the ViT has layers 0..{N_LAYERS}")
    torch.set_num_threads(min(2, torch.get_num_threads()))
    px = to_pixels(load_image(image)).unsqueeze(0).to(device, dtype)
    model = load_vit().to(device, dtype)
    run_vit(model, px)
    full, seconds_full = _timed(lambda: run_vit(model, px), device)
    run, seconds = _timed(lambda: run_vit(model, px, selector, budget=budget, ratio=keep, layer=layer), device)
    out = {
        "image": str(image), "method": method, "layer": layer,
        "tokens_in": run.tokens_in, "tokens_kept": int(run.last_hidden_state.shape[1] - 1),
        "tokens_per_layer": run.tokens_per_layer,
        "kept_indices": run.indices[0].tolist(),
        "cls_cosine": F.cosine_similarity(run.cls.float(), full.cls.float()).item(),
        "pooled_cosine": F.cosine_similarity(run.pooled.float(), full.pooled.float()).item(),
        "seconds": seconds, "seconds_full": seconds_full,
    }
    if selector.merges:
        out["sizes"] = [int(s) for s in run.sizes[0].tolist()]
    return out


def _timed(fn, device="cpu"):
    """``(fn(), wall seconds)``, the device's queued work included."""
    from tokensift.devices import clock

    start = clock(device)
    value = fn()
    return value, clock(device) - start


def _methods() -> list[dict]:
    """Name, kind and first docstring line of every method."""
    from .selectors import SELECTORS

    rows = []
    for name in sorted(SELECTORS):
        cls = SELECTORS[name]
        kind = "merge" if cls.merges else "prune"
        rows.append({"name": name, "kind": kind, "summary": (cls.__doc__ or "").strip().splitlines()[0]})
    return rows


def _print_methods(as_json: bool) -> None:
    """Print the method list."""
    rows = _methods()
    if as_json:
        typer.echo(json.dumps(rows))
        return
    for row in rows:
        typer.echo(f"{row['name']:<10} {row['kind']:<6} {row['summary']}")


def _print_result(result: dict, as_json: bool) -> None:
    """Print the result as JSON or a short human summary."""
    if as_json:
        typer.echo(json.dumps(result))
        return
    typer.echo(
        f"{result['method']} after layer {result['layer']}: kept {result['tokens_kept']}/{result['tokens_in']} "
        f"patch tokens; [CLS] cosine {result['cls_cosine']:.4f}, pooled cosine {result['pooled_cosine']:.4f}; "
        f"{result['seconds'] * 1000:.1f} ms vs {result['seconds_full'] * 1000:.1f} ms full"
    )
