"""llama.cpp's own draft-free speculation beside tokensift's (issue 22, the llama.cpp column).

llama-cpp-python's prompt lookup decoding (``Llama(draft_model=LlamaPromptLookupDecoding(...))``)
against llama.cpp's plain greedy decoding, on the prompts of ``tokensift bench --suite spec-fresh``
(suite prompts 0-3 of each category and the 15 held-out prompts) and the same model file (the
embedded SmolLM2-135M-Instruct Q4_1 GGUF). What compares across the two systems is each one's
speed-up over its OWN plain greedy, measured in the same run: llama.cpp runs Q4_1 kernels while
tokensift runs the GGUF dequantized to fp32 in transformers, so absolute tok/s do not compare.

Two steps, two virtual environments (llama-cpp-python compiles for many minutes, so it is not a
tokensift dependency):

    # 1. with tokensift's venv: the exact prompt texts and token ids tokensift feeds the model
    .venv/bin/python benchmarks/llamacpp_lookup.py export benchmarks/results/spec-fresh/llamacpp/prompts.json
    # 2. with a venv holding llama-cpp-python (no torch, no tokensift needed)
    .venv-llamacpp/bin/python benchmarks/llamacpp_lookup.py run benchmarks/results/spec-fresh/llamacpp/prompts.json \
        --gguf PATH/SmolLM2-135M-Instruct.Q4_1.gguf --threads 1 --out benchmarks/results/spec-fresh/llamacpp

The prompt tokens given to llama.cpp are the token ids of tokensift's Hugging Face tokenizer for
the same text (chat template applied exactly as spec-fresh applies it), so both systems start from
identical inputs. Each generation: greedy (temperature 0, repeat penalty 1), up to ``--new-tokens``
(128, as spec-fresh) or end of sequence; decode tok/s = (new tokens - 1) / (time of the last token -
time of the first), as tokensift's CLI reports it (the first token comes out of the prefill); tokens
per step = (new tokens - 1) / decode calls of ``Llama.eval``. The arms of a prompt run one after
the other in one process, the order rotating from prompt to prompt;
each arm has its own ``Llama`` object and is reset before every prompt (no KV prefix reuse).
Arms: ``plain`` and ``lookupN`` (``LlamaPromptLookupDecoding(max_ngram_size=2, num_pred_tokens=N)``;
N=10 is llama-cpp-python's default, N=2 the value its README suggests for CPU-only machines).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

CATEGORIES = ("code", "summarization", "qa", "chat", "copy")


def export_prompts(path: Path, suite_per_category: int = 4) -> None:
    """Write the spec-fresh prompts (text and tokensift's input ids) to ``path`` (needs tokensift)."""
    from tokensift.bench.spec_fresh import heldout_prompts
    from tokensift.bench.spec_suite import spec_prompts
    from tokensift.models import load_model, smollm2_gguf

    _, tokenizer = load_model(None)
    prompts = [dict(p, split="suite") for p in spec_prompts(tokenizer, 4) if int(p["name"].rsplit("-", 1)[1]) < suite_per_category]
    prompts += [dict(p, split="heldout") for p in heldout_prompts(tokenizer)]
    for prompt in prompts:
        prompt["input_ids"] = tokenizer(prompt["text"])["input_ids"]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"about": "spec-fresh prompts as tokensift builds them (spec_prompts(tokenizer, 4) prompts 0-3 per "
                                         "category, then spec_heldout.json), input_ids from tokensift's tokenizer",
                                "gguf": smollm2_gguf().name, "eos_token_id": tokenizer.eos_token_id, "prompts": prompts}, indent=1))
    print(f"wrote {len(prompts)} prompts to {path}")


def geomean(values: list[float]) -> float:
    values = [v for v in values if v > 0]
    return math.exp(sum(map(math.log, values)) / len(values)) if values else float("nan")


@functools.cache
def worker():
    """``tokensift/bench/llamacpp_worker.py``, loaded by path (this venv has no torch and no tokensift)."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "tokensift" / "bench" / "llamacpp_worker.py"
    spec = importlib.util.spec_from_file_location("llamacpp_worker", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def generate(llm, input_ids: list[int], new_tokens: int, stop_ids: set[int]) -> dict:
    """One greedy generation, timed as the spec-fresh suite's llama.cpp worker times it."""
    out = worker().timed_generate(llm, input_ids, new_tokens, stop_ids)
    out["tokens_per_step"] = out.pop("accepted_per_step")
    return out


def run(args) -> None:
    try:
        import llama_cpp
        from llama_cpp import Llama
        from llama_cpp.llama_speculative import LlamaPromptLookupDecoding
    except ImportError:
        sys.exit("llama_cpp is not importable: install llama-cpp-python (e.g. in a separate venv) to run this benchmark")
    data = json.loads(Path(args.prompts).read_text())
    prompts = data["prompts"]
    if args.limit:
        prompts = [p for p in prompts if int(p["name"].rsplit("-", 1)[1]) < args.limit]
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    arms = args.arms.split(",")
    n_ctx = max(len(p["input_ids"]) for p in prompts) + args.new_tokens + 64

    def make(arm: str):
        draft = None if arm == "plain" else LlamaPromptLookupDecoding(num_pred_tokens=int(arm.removeprefix("lookup")))
        return Llama(model_path=args.gguf, n_ctx=n_ctx, n_threads=args.threads, n_threads_batch=args.threads,
                     draft_model=draft, seed=0, verbose=False)

    models = {arm: make(arm) for arm in arms}
    stop_ids = {models[arms[0]].token_eos()} | ({data["eos_token_id"]} if data.get("eos_token_id") is not None else set())
    results_path = out_dir / f"results_t{args.threads}.jsonl"
    load_start = os.getloadavg()
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    # warm-up (page in the weights, first-call overheads), not recorded
    for llm in models.values():
        generate(llm, prompts[0]["input_ids"], 8, stop_ids)
    records = []
    order = sorted(range(len(prompts)), key=lambda i: (prompts[i]["split"] != "heldout", int(prompts[i]["name"].rsplit("-", 1)[1]), i))
    with results_path.open("w") as sink:
        for position, index in enumerate(order):
            prompt = prompts[index]
            for repeat in range(args.repeats):
                shift = (position + repeat) % len(arms)
                for arm in arms[shift:] + arms[:shift]:
                    load = round(os.getloadavg()[0], 2)
                    out = generate(models[arm], prompt["input_ids"], args.new_tokens, stop_ids)
                    record = {"split": prompt["split"], "category": prompt["category"], "prompt": prompt["name"], "arm": arm,
                              "repeat": repeat, "threads": args.threads, "prompt_tokens": len(prompt["input_ids"]),
                              **out, "load_before": load}
                    records.append(record)
                    sink.write(json.dumps(record) + "\n")
                    sink.flush()
                    print(f"[llamacpp t{args.threads}] {prompt['name']} {arm}: {out['tokens_per_second']:.1f} tok/s "
                          f"({out['new_tokens']} tokens)", flush=True)
    summary = summarize(records, arms, prompts)
    if args.tokensift_results and Path(args.tokensift_results).exists():  # how far llama.cpp's Q4_1 greedy tracks tokensift's fp32
        theirs = {r["prompt"]: r["token_ids"] for r in map(json.loads, Path(args.tokensift_results).open()) if r["arm"] == "plain"}
        ours = {r["prompt"]: r["token_ids"] for r in records if r["arm"] == "plain" and r["repeat"] == 0}

        def common(a, b):
            n = 0
            while n < min(len(a), len(b)) and a[n] == b[n]:
                n += 1
            return n

        prefix = {name: common(ours[name], theirs[name]) for name in ours if name in theirs}
        summary["plain_vs_tokensift_plain"] = {
            "about": "common prefix (tokens) of llama.cpp's plain greedy (Q4_1 kernels) and tokensift's plain greedy (fp32 "
                     "dequantized weights), from " + str(args.tokensift_results),
            "identical": sum(ours[n] == theirs[n] for n in prefix), "prompts": len(prefix), "common_prefix": prefix}
    summary.update({"llama_cpp_python": llama_cpp.__version__, "threads": args.threads, "new_tokens": args.new_tokens,
                    "gguf": args.gguf, "started": started, "finished": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
                    "load_start": load_start, "load_end": os.getloadavg(), "machine": platform.processor() or platform.machine(),
                    "cpus": os.cpu_count(), "system_info": llama_cpp.llama_print_system_info().decode(),
                    "lookup": "llama_cpp.llama_speculative.LlamaPromptLookupDecoding(max_ngram_size=2, num_pred_tokens=N)"})
    (out_dir / f"summary_t{args.threads}.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps({k: summary[k] for k in ("lossless", "per_category")}, indent=1))


def summarize(records: list[dict], arms: list[str], prompts: list[dict]) -> dict:
    """Per split and category: geometric mean of lookup/plain tok/s ratios (median over repeats first).

    Only prompts that ran every arm count (a stopped run still summarizes)."""
    ran = {(r["prompt"], r["arm"]) for r in records}
    prompts = [p for p in prompts if all((p["name"], arm) in ran for arm in arms)]
    by = {}
    for r in records:
        by.setdefault((r["prompt"], r["arm"]), []).append(r)
    plain_ids = {(r["prompt"], r["repeat"]): r["token_ids"] for r in records if r["arm"] == "plain"}
    lossless = {arm: {"identical": 0, "runs": 0, "differ": []} for arm in arms if arm != "plain"}
    for r in records:
        if r["arm"] != "plain" and (r["prompt"], r["repeat"]) in plain_ids:
            same = r["token_ids"] == plain_ids[(r["prompt"], r["repeat"])]
            lossless[r["arm"]]["runs"] += 1
            lossless[r["arm"]]["identical"] += same
            if not same:
                ref = plain_ids[(r["prompt"], r["repeat"])]
                first = next((i for i, (a, b) in enumerate(zip(r["token_ids"], ref)) if a != b), min(len(ref), len(r["token_ids"])))
                lossless[r["arm"]]["differ"].append({"prompt": r["prompt"], "repeat": r["repeat"], "first_difference": first})

    def median(values):
        values = sorted(values)
        mid = len(values) // 2
        return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2

    rate = {key: median([r["tokens_per_second"] for r in rows]) for key, rows in by.items()}
    per_step = {key: median([r["tokens_per_step"] for r in rows]) for key, rows in by.items()}
    per_category = {}
    for split in ("suite", "heldout"):
        names = [p["name"] for p in prompts if p["split"] == split]
        if not names:
            continue
        table = {}
        for category in CATEGORIES:
            cat_names = [p["name"] for p in prompts if p["split"] == split and p["category"] == category]
            if not cat_names:
                continue
            row = {"prompts": len(cat_names), "tok_s": {arm: round(sum(rate[(n, arm)] for n in cat_names) / len(cat_names), 2) for arm in arms}}
            row["tokens_per_step"] = {arm: round(sum(per_step[(n, arm)] for n in cat_names) / len(cat_names), 2) for arm in arms}
            for arm in arms:
                if arm != "plain":
                    row[f"{arm}_vs_plain"] = round(geomean([rate[(n, arm)] / rate[(n, "plain")] for n in cat_names]), 3)
            table[category] = row
        table["overall"] = {f"{arm}_vs_plain": round(geomean([table[c][f"{arm}_vs_plain"] for c in CATEGORIES if c in table]), 3)
                            for arm in arms if arm != "plain"}
        per_category[split] = table
    per_prompt = {name: {arm: round(rate[(name, arm)], 2) for arm in arms if (name, arm) in rate}
                  for name in dict.fromkeys(r["prompt"] for r in records)}
    return {"lossless": lossless, "per_category": per_category, "per_prompt_tok_s": per_prompt}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    export = sub.add_parser("export", help="write the spec-fresh prompts (needs tokensift)")
    export.add_argument("path", type=Path)
    go = sub.add_parser("run", help="run llama.cpp plain vs prompt lookup (needs llama-cpp-python)")
    go.add_argument("prompts", type=Path)
    go.add_argument("--gguf", required=True)
    go.add_argument("--out", default="benchmarks/results/spec-fresh/llamacpp")
    go.add_argument("--threads", type=int, default=1)
    go.add_argument("--new-tokens", type=int, default=128)
    go.add_argument("--arms", default="plain,lookup10,lookup2")
    go.add_argument("--repeats", type=int, default=1)
    go.add_argument("--tokensift-results", default="benchmarks/results/spec-fresh/results.jsonl",
                    help="tokensift's spec-fresh results.jsonl: report how far the two plain greedy outputs agree")
    go.add_argument("--limit", type=int, default=0, help="only prompts whose index is below this (quick runs)")
    again = sub.add_parser("summarize", help="summarize a results file (e.g. of a stopped run) without llama-cpp-python")
    again.add_argument("results", type=Path)
    again.add_argument("prompts", type=Path)
    again.add_argument("summary", type=Path)
    args = parser.parse_args()
    if args.command == "export":
        export_prompts(args.path)
    elif args.command == "summarize":
        records = [json.loads(line) for line in args.results.open()]
        arms = list(dict.fromkeys(r["arm"] for r in records))
        summary = summarize(records, arms, json.loads(args.prompts.read_text())["prompts"])
        summary.update({"partial_run": str(args.results), "rows": len(records),
                        "prompts_complete": sum(1 for t in summary["per_category"].values()
                                                for c, row in t.items() if c != "overall" for _ in range(row["prompts"]))})
        args.summary.write_text(json.dumps(summary, indent=1))
        print(json.dumps(summary["per_category"], indent=1))
    else:
        run(args)


if __name__ == "__main__":
    main()
