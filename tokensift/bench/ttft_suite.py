"""Time to first token: pruning prefills against ``full`` on retrieval and essay QA prompts.

``tokensift bench --suite ttft --out DIR [--model NAME] [--lengths 4096] [--tasks ...]
[--protocols ...] [--policies full,lazyllm,gemfilter] [--samples 8]`` writes ``results.jsonl``
(one row per task, protocol, length and prefill), ``report.md`` and ``score_vs_ttft.png``.

Each prompt is prefilled under every prefill policy in turn (the order rotates from prompt to
prompt, so load drift on this shared machine hits them alike), into a full KV cache; then the
suffix (the question in the query-agnostic protocol, the answer cue in the query-aware one) is
fed and the answer decoded greedily and scored. TTFT = prefill + suffix forward, the time until
the first answer token's logits. Speed is reported as the geometric mean over prompts of the
paired ratio full TTFT / policy TTFT. Rows resume per (task, protocol, length).
"""

from __future__ import annotations

import statistics
from pathlib import Path

import torch

from tokensift.bench.results import append_rows, read_rows
from tokensift.bench.suite import Suite
from tokensift.bench.table import fmt, markdown_table
from tokensift.bench.timing import geomean, load_1min
from tokensift.devices import clock, model_device
from tokensift.errors import TokensiftError

DEFAULT_PREFILLS = ("full", "lazyllm", "gemfilter")
DEFAULT_TASKS = ("niah", "niah_multikey", "essay_qa")
DEFAULT_PROTOCOLS = ("query_aware", "query_agnostic")


def parse_prefill(expression: str):
    """``name`` or ``name(key=value,key=value)`` (tuples as ``a;b``) -> a built prefill policy."""
    from tokensift.prefill import build_prefill

    name, _, rest = expression.partition("(")
    params = {}
    for item in filter(None, (part.strip() for part in rest.rstrip(")").split(","))):
        key, sep, value = item.partition("=")
        if not sep:
            raise TokensiftError(f"prefill expression '{expression}': expected key=value, got '{item}'")
        params[key.strip()] = value.strip()
    return build_prefill(name.strip(), **params)


@torch.inference_mode()
def answer(model, cache, instance, tokenizer) -> tuple[float, float, list[int]]:
    """Feed the suffix, decode greedily; (score, seconds of the suffix forward, tokens)."""
    from tokensift.bench.decode import GreedyDecoder
    from tokensift.bench.tasks import get_task

    spec, device = get_task(instance.task), model_device(model)
    decoder = GreedyDecoder(model, cache)
    start = clock(device)
    logits = decoder.feed([instance.suffix_ids])
    suffix_seconds = clock(device) - start

    def settled(row: int, tokens: list[int]) -> bool:
        return spec.settled(instance, tokenizer.decode(tokens, skip_special_tokens=True))

    tokens = decoder.run(logits, instance.max_new_tokens, settled)[0]
    return spec.score(instance, tokenizer.decode(tokens, skip_special_tokens=True)), suffix_seconds, tokens


@torch.inference_mode()
def prefill_once(model, prefill, ids: list[int]) -> tuple[object, float, float]:
    """A full-policy cache prefilled under ``prefill``: (cache, seconds, mean tokens kept per layer)."""
    from tokensift.engine import make_cache
    from tokensift.generate import Decoder
    from tokensift.policies import build_policy

    device = model_device(model)
    cache = make_cache(model, build_policy("full"))
    tensor = torch.tensor([ids], dtype=torch.long, device=device)
    start = clock(device)
    decoder = Decoder(model, cache)
    if prefill.prunes:
        decoder.prefill_pruned(prefill, tensor)
    else:
        decoder.prefill(tensor, torch.ones_like(tensor), None)
    return cache, clock(device) - start, cache.kv_tokens()


def run_cell(model, tokenizer, prefills: dict, task: str, protocol: str, length: int, samples: int, seed: int) -> dict:
    """Every prefill on every prompt of one cell, interleaved; per prefill: scores, TTFTs, kept tokens."""
    from tokensift.bench.tasks import build_instances

    instances = build_instances(task, tokenizer, length, samples, seed, protocol)
    names = list(prefills)
    record = {name: {"scores": [], "ttft": [], "prefill": [], "kept": []} for name in names}
    for index, instance in enumerate(instances):
        order = names[index % len(names):] + names[:index % len(names)]
        for name in order:
            cache, seconds, kept = prefill_once(model, prefills[name], instance.context_ids)
            score, suffix_seconds, _ = answer(model, cache, instance, tokenizer)
            entry = record[name]
            entry["scores"].append(score), entry["prefill"].append(seconds)
            entry["ttft"].append(seconds + suffix_seconds), entry["kept"].append(kept)
            del cache
    return record


def rows_of(record: dict, prefills: dict, task: str, protocol: str, length: int, fields: dict) -> list[dict]:
    full = record.get("full")
    rows = []
    for name, entry in record.items():
        ratios = [f / t for f, t in zip(full["ttft"], entry["ttft"])] if full else []
        rows.append({
            "task": task, "protocol": protocol, "length": length, "prefill": name,
            "params": prefills[name].params(), "score": statistics.fmean(entry["scores"]), "scores": entry["scores"],
            "ttft_median": statistics.median(entry["ttft"]), "ttft": entry["ttft"], "prefill_seconds": entry["prefill"],
            "speedup_vs_full": geomean(ratios) if ratios else None,
            "kept_tokens_per_layer": statistics.fmean(entry["kept"]), "samples": len(entry["scores"]), **fields,
        })
    return rows


def run_ttft_suite(out_dir: Path, model: str | None = None, lengths=(4096,), tasks=DEFAULT_TASKS,
                   protocols=DEFAULT_PROTOCOLS, prefills=DEFAULT_PREFILLS, samples: int | None = None, seed: int = 0,
                   device: str | None = None, dtype: str | None = None) -> None:
    """Run the TTFT suite into ``out_dir`` (resumable per task, protocol and length)."""
    from tokensift.kernels import packed_linears
    from tokensift.models import load_model

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    built = {expression: parse_prefill(expression) for expression in prefills}
    if "full" not in built:
        raise TokensiftError("the ttft suite compares against full prefill: include 'full' in --policies")
    samples = samples or 8
    model_label = model or "smollm2"
    model_obj, tokenizer = load_model(model_label, device=device, dtype=dtype)
    results = out_dir / "results.jsonl"
    done = {(r["task"], r["protocol"], r["length"]) for r in read_rows(results, repair=True)}
    fields = {"model": model_label, "threads": torch.get_num_threads(), "kernels": "packed", "seed": seed,
              "dtype": str(next(model_obj.parameters()).dtype).replace("torch.", "")}
    with packed_linears(model_obj):
        for length in lengths:
            for task in tasks:
                for protocol in protocols:
                    if (task, protocol, length) in done:
                        continue
                    record = run_cell(model_obj, tokenizer, built, task, protocol, length, samples, seed)
                    load = {"load": load_1min()}
                    append_rows(results, rows_of(record, built, task, protocol, length, fields | load))
                    print(f"ttft: {task} {protocol} {length} done", flush=True)
    write_report(out_dir)


def write_report(out_dir: Path) -> None:
    """report.md (one table per length and protocol) and score_vs_ttft.png from results.jsonl."""
    rows = read_rows(Path(out_dir) / "results.jsonl")
    if not rows:
        return
    parts = ["# Time to first token: pruning prefills against full prefill", "",
             "Score: mean over prompts; TTFT: median seconds (prefill + suffix forward); speed-up: geometric mean of "
             "paired per-prompt ratios full/policy (same run, interleaved); Δ: points (x100) against full.", ""]
    for length in sorted({r["length"] for r in rows}):
        for protocol in sorted({r["protocol"] for r in rows if r["length"] == length}):
            cell = [r for r in rows if r["length"] == length and r["protocol"] == protocol]
            parts += [f"## {length} tokens, {protocol} ({cell[0]['model']}, {cell[0]['samples']} prompts per task)", "",
                      table(cell), ""]
    (Path(out_dir) / "report.md").write_text("\n".join(parts))
    plot(rows, Path(out_dir) / "score_vs_ttft.png")


SUITE = Suite(names=("ttft",), options=("model", "lengths", "tasks", "protocols", "policies", "samples", "seed"),
              runner=f"{__name__}:run_ttft_suite", reporter=f"{__name__}:write_report",
              renames={"policies": "prefills"})  # --policies: prefill policies


def table(rows: list[dict]) -> str:
    full = {r["task"]: r for r in rows if r["prefill"] == "full"}
    body = []
    for r in sorted(rows, key=lambda r: (r["task"], r["prefill"] != "full", r["prefill"])):
        base = full.get(r["task"])
        delta = "" if base is None or r["prefill"] == "full" else f"{100 * (r['score'] - base['score']):+.0f}"
        body.append([r["task"], r["prefill"], fmt(r["score"]), delta, fmt(r["ttft_median"], 1),
                     fmt(r["speedup_vs_full"], 2, "x") if r["speedup_vs_full"] else "", fmt(r["kept_tokens_per_layer"], 0)])
    return markdown_table(["task", "prefill", "score", "Δ vs full", "TTFT s", "speed-up", "tokens kept / layer"], body)


def plot(rows: list[dict], path: Path) -> None:
    """Score against median TTFT, one marker per prefill, one panel per length and protocol."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    cells = sorted({(r["length"], r["protocol"]) for r in rows})
    figure, axes = plt.subplots(1, len(cells), figsize=(5 * len(cells), 4), squeeze=False)
    markers = dict(zip(sorted({r["prefill"] for r in rows}), "osD^v<>"))
    colors = dict(zip(sorted({r["task"] for r in rows}), plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    for axis, (length, protocol) in zip(axes[0], cells):
        for r in (r for r in rows if r["length"] == length and r["protocol"] == protocol):
            axis.scatter(r["ttft_median"], r["score"], marker=markers[r["prefill"]], color=colors[r["task"]], s=50)
        axis.set_title(f"{rows[0]['model']} {length} tokens, {protocol}", fontsize=9)
        axis.set_xlabel("time to first token (s, median)")
        axis.set_ylabel("score")
        axis.set_ylim(-0.05, 1.05)
    handles = [plt.Line2D([], [], marker=m, linestyle="", color="gray", label=n) for n, m in markers.items()]
    handles += [plt.Line2D([], [], marker="o", linestyle="", color=c, label=t) for t, c in colors.items()]
    axes[0][-1].legend(handles=handles, fontsize=7, loc="best")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
