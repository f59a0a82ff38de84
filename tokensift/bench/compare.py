"""``tokensift compare kvpress``: NVIDIA kvpress on the same task instances, merged into the
same ``results.jsonl`` (``library: kvpress``) and report.

Same model (the embedded SmolLM2 GGUF, or ``model``: gemma3 / a .gguf), same token ids, same query-agnostic protocol, and the
same size definition: a tokensift budget of B tokens per head at a context of C tokens is run
in kvpress as keep ratio B / C (kvpress ``compression_ratio`` = 1 - B / C).

On Gemma 3 the two do not compress the same layers: tokensift's policies act on the 3
full-attention layers (the 15 sliding-window layers keep their last 511 tokens), while the
kvpress worker prefills into a plain ``DynamicCache`` (every layer holds every token) and its
press hook runs on every attention layer, sliding-window layers included, at the same keep ratio
(the sliding layers' attention mask still limits what they read). The rows say so (``kvpress_layers``).
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from tokensift.bench import kvpress_compare
from tokensift.bench.report import write_report
from tokensift.bench.results import Results
from tokensift.bench.tasks import QUERY_AGNOSTIC, build_instances, default_tokenizer, write_jsonl
from tokensift.errors import TokensiftError


def kvpress_cell(task: str, length: int, press: str, budget: int) -> str:
    return f"{task}|{QUERY_AGNOSTIC}|{length}|kvpress:{press}@{budget}"


def compare_kvpress(out: Path, tasks: list[str], length: int, samples: int, seed: int, budgets: list[int],
                    presses: list[str], threads: int = 2, model: str | None = None, device: str | None = None,
                    dtype: str | None = None) -> None:
    """Run the presses at the budgets' keep ratios and merge the rows into ``out`` (the kvpress
    worker runs the model on ``device`` in ``dtype``; rows record both)."""
    from tokensift.devices import resolve_device, resolve_dtype

    device, dtype = str(resolve_device(device)), str(resolve_dtype(dtype)).removeprefix("torch.")
    kvpress_compare.make_runs(presses, [0.5])  # unknown presses: a one-line error before anything is written
    if samples < 1:
        raise TokensiftError(f"--samples must be at least 1, got {samples}")
    if any(budget < 1 for budget in budgets):
        raise TokensiftError(f"budgets must be at least 1 token, got {budgets}")
    tokenizer = model_tokenizer(model)
    instances = [i for task in tasks for i in build_instances(task, tokenizer, length, samples, seed)]
    out.mkdir(parents=True, exist_ok=True)
    results = Results(out / "results.jsonl")
    context = len(instances[0].context_ids)
    keep_of = {budget: budget / context for budget in budgets}
    todo = [(p, b) for p in presses for b in budgets if not all(kvpress_cell(t, length, p, b) in results.done for t in tasks)]
    if not todo:
        write_report(out)
        return
    instances_path = out / f"kvpress_instances_{length}.jsonl"
    write_jsonl(instances, instances_path)
    todo_presses = sorted({p for p, _ in todo})
    rows = kvpress_compare.run(instances_path, todo_presses, [keep_of[b] for b in budgets], out / f"kvpress_rows_{length}.jsonl",
                                threads=threads, model=model, device=device, dtype=dtype)
    budget_of = {round(keep, 9): budget for budget, keep in keep_of.items()}
    for (task, press, budget), group in group_rows(rows, budget_of).items():
        cell = kvpress_cell(task, length, press, budget)
        if cell not in results.done and (press, budget) in todo:
            row = kvpress_result_row(cell, task, length, press, budget, keep_of[budget], seed, group, threads)
            results.write(row | {"model": model or "smollm2", "kvpress_layers": kvpress_layers(model),
                                 "device": device, "dtype": dtype})
    write_report(out)


def model_tokenizer(model: str | None):
    """The tokenizer the instances are built with: the embedded one, or the model's own."""
    if model in (None, "", "smollm2"):
        return default_tokenizer()
    from tokensift.models import load_model

    return load_model(model)[1]


def kvpress_layers(model: str | None) -> str:
    """Which layers the kvpress press compresses (see the module docstring)."""
    if model in ("gemma3", "gemma3-270m"):
        return "every attention layer (Gemma 3: 15 sliding-window + 3 full-attention), plain DynamicCache"
    return "every attention layer"


def group_rows(rows: list[dict], budget_of: dict) -> dict:
    groups = defaultdict(list)
    for row in rows:
        task = row["key"].split("/")[0]
        groups[(task, row["press"], budget_of[round(row["keep_ratio"], 9)])].append(row)
    return groups


def kvpress_result_row(cell, task, length, press, budget, keep, seed, group, threads: int = 2) -> dict:
    scores = [r["score"] for r in group if r.get("score") is not None]
    errors = sorted({r.get("error", "") for r in group if r.get("status") == "error"})
    kept = [r["kv_tokens_effective"] for r in group if r.get("kv_tokens_effective") is not None]
    return {
        "cell": cell, "library": "kvpress", "task": task, "protocol": QUERY_AGNOSTIC, "length": length,
        "policy": press, "budget": budget, "ratio": None, "keep_ratio": keep,
        "kvpress_compression_ratio": 1 - keep, "params": {"press": press, "compression_ratio": 1 - keep},
        "samples": len(scores), "score": sum(scores) / len(scores) if scores else None,
        "sample_scores": scores, "kv_tokens": sum(kept) / len(kept) if kept else None,
        "errors": errors, "versions": {"kvpress": kvpress_compare.KVPRESS_VERSION,
                                       "transformers": kvpress_compare.KVPRESS_TRANSFORMERS},
        "seed": seed, "suite": "compare",
        "machine": {"threads": threads},
    }
