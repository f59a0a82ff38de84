"""What one llama.cpp model call costs for 1, 2, 3, 6 and 11 tokens (issue 22, llama.cpp column).

Explains the lookup-decoding ratios of ``llamacpp_lookup.py``: a verification step of the prompt
lookup arms evaluates the last token plus up to N drafts in one ``Llama.eval`` (with every row's
logits, ``logits_all``, as llama-cpp-python's speculation requires), plain decoding evaluates one token.
Median wall time of ``--rounds`` calls per width, after a spec-fresh prompt (KV kept at the prompt,
rows removed after each call), widths alternating; 1 thread unless ``--threads``.

    .venv-llamacpp/bin/python benchmarks/llamacpp_step_cost.py --gguf PATH.gguf \\
        --prompts benchmarks/results/spec-fresh/llamacpp/prompts.json --out benchmarks/results/spec-fresh/llamacpp/step_cost_t1.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gguf", required=True)
    parser.add_argument("--prompts", type=Path, required=True)
    parser.add_argument("--prompt", default="summ-0")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    try:
        import llama_cpp
        from llama_cpp import Llama
    except ImportError:
        sys.exit("llama_cpp is not importable: install llama-cpp-python (e.g. in a separate venv) to run this probe")
    prompt = next(p for p in json.loads(args.prompts.read_text())["prompts"] if p["name"] == args.prompt)["input_ids"]
    widths = (1, 2, 3, 6, 11)
    result = {"llama_cpp_python": llama_cpp.__version__, "threads": args.threads, "prompt": args.prompt,
              "prompt_tokens": len(prompt), "load_start": os.getloadavg(), "seconds": {}}
    for logits_all in (False, True):
        llm = Llama(model_path=args.gguf, n_ctx=len(prompt) + 64, n_threads=args.threads, n_threads_batch=args.threads,
                    logits_all=logits_all, verbose=False)
        llm.eval(prompt)
        times = {w: [] for w in widths}
        for _ in range(args.rounds):
            for w in widths:
                llm.n_tokens = len(prompt)  # eval() removes the KV rows past n_tokens first
                start = time.perf_counter()
                llm.eval(prompt[-w:])
                times[w].append(time.perf_counter() - start)
        medians = {w: statistics.median(times[w]) for w in widths}
        result["seconds"][f"logits_all={logits_all}"] = {
            str(w): {"median_ms": round(1000 * medians[w], 2), "vs_1_token_plain": None} for w in widths}
        del llm
    base = result["seconds"]["logits_all=False"]["1"]["median_ms"]
    for table in result["seconds"].values():
        for row in table.values():
            row["vs_1_token_plain"] = round(row["median_ms"] / base, 2)
    result["load_end"] = os.getloadavg()
    print(json.dumps(result, indent=1))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
