"""Where a long prefill's time goes, per layer type: ``python -m tokensift.bench.prefill_profile``.

Prefills a needle prompt (the benchmark's own ``record_prefill``, packed linears) at each length
with the stock SDPA path for sliding-window layers and with the banded path
(:mod:`tokensift.banded`), timing each layer's attention kernel, its attention block
(projections, norms, RoPE, cache update, kernel) and its MLP, summed per layer type. Writes one
JSON row per (length, path) to ``--out`` and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections import defaultdict
from pathlib import Path

import torch
from transformers import AttentionInterface

from tokensift import attention, banded
from tokensift.attention import NAME


def _layer_kind(config, index: int) -> str:
    types = getattr(config.get_text_config(decoder=True), "layer_types", None)
    return types[index] if types else "full_attention"


def profile_prefill(model, input_ids: torch.Tensor, use_banded: bool) -> dict:
    """One prefill of ``input_ids``; seconds per layer type for the kernel, attention block and MLP."""
    from tokensift.bench.replay import record_prefill

    config = model.config
    times: dict = defaultdict(float)
    starts: dict = {}
    hooks = []
    decoder = model.model if hasattr(model, "model") else model
    for index, layer in enumerate(decoder.layers):
        kind = _layer_kind(config, index)
        for part, module in (("attention_block", layer.self_attn), ("mlp", layer.mlp)):
            key = (kind, part)
            hooks.append(module.register_forward_pre_hook(lambda m, a, key=key: starts.__setitem__(key, time.perf_counter())))
            hooks.append(module.register_forward_hook(
                lambda m, a, o, key=key: times.__setitem__(key, times[key] + time.perf_counter() - starts[key])))

    def timed(module, *args, **kwargs):
        kind = "sliding_attention" if kwargs.get("sliding_window") else "full_attention"
        started = time.perf_counter()
        out = original(module, *args, **kwargs)
        times[(kind, "kernel")] += time.perf_counter() - started
        return out

    previous = banded.ENABLED[0]
    banded.ENABLED[0] = use_banded
    original = attention.tokensift_attention
    attention.tokensift_attention = timed  # make_cache re-registers the module's function: swap it there
    AttentionInterface.register(NAME, timed)
    try:
        started = time.perf_counter()
        record_prefill(model, input_ids)
        total = time.perf_counter() - started
    finally:
        attention.tokensift_attention = original
        AttentionInterface.register(NAME, original)
        banded.ENABLED[0] = previous
        for hook in hooks:
            hook.remove()
    counts = defaultdict(int)
    for index in range(len(decoder.layers)):
        counts[_layer_kind(config, index)] += 1
    return {
        "tokens": input_ids.shape[1], "path": "banded" if use_banded else "stock", "seconds": total,
        "tokens_per_second": input_ids.shape[1] / total, "layers": dict(counts),
        "per_type": {f"{kind}/{part}": seconds for (kind, part), seconds in sorted(times.items())},
    }


def kernel_row(length: int, heads: int = 4, kv_heads: int = 1, dim: int = 256, window: int = 512, repeats: int = 2,
               stock: bool = True) -> dict:
    """One sliding-window layer's attention over ``length`` new tokens (Gemma 3 270M shapes), stock SDPA
    with the n×n mask against the banded path, timed alternately; max abs difference of the outputs."""
    from types import SimpleNamespace

    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    generator = torch.Generator().manual_seed(0)
    query = torch.randn(1, heads, length, dim, generator=generator)
    key, value = (torch.randn(1, kv_heads, length, dim, generator=generator) for _ in range(2))
    i, j = torch.arange(length)[:, None], torch.arange(length)[None]
    mask = ((j <= i) & (j > i - window))[None, None]
    module = SimpleNamespace(num_key_value_groups=heads // kv_heads, is_causal=True, training=False)
    cases = {"banded": lambda: banded.banded_attention(module, query, key, value, mask, window, dim ** -0.5)}
    if stock:
        cases["stock"] = lambda: sdpa_attention_forward(module, query, key, value, mask, scaling=dim ** -0.5)[0]
    times: dict = defaultdict(list)
    outputs = {}
    for _ in range(repeats):
        for name, run in cases.items():
            started = time.perf_counter()
            outputs[name] = run()
            times[name].append(time.perf_counter() - started)
    row = {"tokens": length, "window": window, "shape": [heads, kv_heads, dim], "repeats": repeats,
           "seconds": {name: min(values) for name, values in times.items()}, "threads": torch.get_num_threads()}
    if stock:
        row["max_abs_diff"] = float((outputs["stock"] - outputs["banded"]).abs().max())
        row["speedup"] = row["seconds"]["stock"] / row["seconds"]["banded"]
    return row


def main() -> None:
    from tokensift.bench.tasks import build_instances
    from tokensift.kernels import packed_linears
    from tokensift.models import load_model

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gemma3")
    parser.add_argument("--lengths", default="8192,16384")
    parser.add_argument("--paths", default="stock,banded")
    parser.add_argument("--out", type=Path, default=Path("runs/prefill_profile.jsonl"))
    parser.add_argument("--kernel", action="store_true", help="one sliding layer's attention only (no model)")
    parser.add_argument("--stock-up-to", type=int, default=16384, help="longest length timed on the stock path too")
    args = parser.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if args.kernel:
        for length in [int(x) for x in args.lengths.split(",")]:
            row = kernel_row(length, stock=length <= args.stock_up_to) | {"kind": "kernel", "load": os.getloadavg()}
            with open(args.out, "a") as handle:
                handle.write(json.dumps(row) + "\n")
            print(json.dumps(row), flush=True)
        return
    model, tokenizer = load_model(args.model)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with packed_linears(model):
        warm = torch.tensor([build_instances("niah", tokenizer, 1024, 1)[0].context_ids])
        profile_prefill(model, warm, True)
        for length in [int(x) for x in args.lengths.split(",")]:
            ids = torch.tensor([build_instances("niah", tokenizer, length, 1)[0].context_ids])
            for path in args.paths.split(","):
                row = profile_prefill(model, ids, path == "banded") | {"model": args.model, "threads": torch.get_num_threads(),
                                                                       "load": os.getloadavg()}
                with open(args.out, "a") as handle:
                    handle.write(json.dumps(row) + "\n")
                parts = "  ".join(f"{k} {v:.1f}s" for k, v in row["per_type"].items())
                print(f"{length} {path}: {row['seconds']:.1f} s, {row['tokens_per_second']:.0f} tok/s | {parts}", flush=True)


if __name__ == "__main__":
    main()
