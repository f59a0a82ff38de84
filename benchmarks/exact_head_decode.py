"""Issue 22, exact greedy int8 lm_head on SmolLM2-135M: decode tokens/s with and without
``exact_int8_head``, plain greedy and ``--speculate auto`` (as the CLI runs it: a fresh
``Speculator`` with the default warm start per generation), on held-out prompts of the spec
suite, 128 new tokens, one thread. The four arms run in the same process, alternated, their order
rotating from round to round, so load from other processes hits them alike; every generation's
tokens are checked against the plain fp32 greedy tokens of its prompt.

    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/exact_head_decode.py \\
        --out benchmarks/results/exact-head/decode.jsonl > benchmarks/results/exact-head/decode_summary.json

Each line of ``--out`` is one generation (arm, prompt, round, tokens/s, steps, head diagnostics,
load average); stdout gets per-arm geometric means and the same-run ratios.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from tokensift.bench.timing import geomean, load_1min

torch.set_num_threads(1)

ARMS = ("plain", "plain_exact", "auto", "auto_exact")
DEFAULT_PROMPTS = "heldout-code-0,heldout-summ-0,heldout-chat-0,heldout-copy-0"


def run_arm(arm: str, model, tokenizer, text: str, new_tokens: int) -> dict:
    from tokensift.generate import generate
    from tokensift.speculative import Speculator
    from tokensift.speculative.warm import warm_start

    exact = arm.endswith("_exact")
    if arm.startswith("plain"):
        result = generate(model, tokenizer, text, max_new_tokens=new_tokens, exact_int8_head=exact)
        return {"token_ids": result.token_ids[0], "tokens_per_second": result.tokens_per_second,
                "decode_seconds": result.decode_seconds, "new_tokens": result.new_tokens}
    speculator = Speculator(model, "auto", exact_int8_head=exact)
    warm_start(speculator, tokenizer, log=lambda message: print(f"# {message}", file=sys.stderr))
    result = speculator.generate(tokenizer, text, max_new_tokens=new_tokens)
    return {"token_ids": result.token_ids, "tokens_per_second": result.tokens_per_second,
            "decode_seconds": result.decode_seconds, "new_tokens": result.new_tokens, "steps": result.steps,
            "accepted_per_step": result.accepted_per_step, "mean_tree_nodes": result.mean_tree_nodes}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompts", default=DEFAULT_PROMPTS, help="held-out prompt names, comma-separated")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--out", required=True, help="jsonl: one line per generation")
    args = parser.parse_args()

    from tokensift.bench.spec_fresh import heldout_prompts
    from tokensift.exact_head import exact_head
    from tokensift.models import load_model

    model, tokenizer = load_model("smollm2")
    wanted = args.prompts.split(",")
    prompts = [p for p in heldout_prompts(tokenizer) if p["name"] in wanted]
    head = exact_head(model)
    rows = []
    with open(args.out, "w") as out:
        # warm-up (not recorded): the warm-start file and both cost curves exist before any timed run
        for arm in ("auto", "auto_exact"):
            run_arm(arm, model, tokenizer, prompts[0]["text"], 8)
        for prompt_index, prompt in enumerate(prompts):
            reference = None
            for round_index in range(args.rounds):
                shift = (prompt_index + round_index) % len(ARMS)
                for arm in ARMS[shift:] + ARMS[:shift]:
                    before = (head.rows, head.full_rows, head.candidate_rows)
                    load = load_1min(digits=None)
                    record = run_arm(arm, model, tokenizer, prompt["text"], args.new_tokens)
                    if arm == "plain" and reference is None:
                        reference = record["token_ids"]
                    row = {"arm": arm, "prompt": prompt["name"], "category": prompt["category"], "round": round_index,
                           "load_1min": load, **{k: v for k, v in record.items() if k != "token_ids"},
                           "head_rows": head.rows - before[0], "head_full_rows": head.full_rows - before[1],
                           "head_candidates": head.candidate_rows - before[2], "token_ids": record["token_ids"]}
                    rows.append(row)
                    out.write(json.dumps(row) + "\n")
                    out.flush()
                    print(f"# {prompt['name']} r{round_index} {arm}: {row['tokens_per_second']:.1f} tok/s", file=sys.stderr)
            for row in rows:
                if row["prompt"] == prompt["name"]:
                    row["identical_to_plain"] = row["token_ids"] == reference
    summary = {"torch": torch.__version__, "threads": torch.get_num_threads(), "new_tokens": args.new_tokens,
               "rounds": args.rounds, "prompts": [p["name"] for p in prompts], "per_arm_best_tok_s": {}, "ratios": {}}
    best = {}  # (arm, prompt) -> fastest round
    for row in rows:
        key = (row["arm"], row["prompt"])
        best[key] = max(best.get(key, 0.0), row["tokens_per_second"])
    for arm in ARMS:
        summary["per_arm_best_tok_s"][arm] = {p["name"]: round(best[(arm, p["name"])], 2) for p in prompts}
        summary["per_arm_best_tok_s"][arm]["geomean"] = round(geomean([best[(arm, p["name"])] for p in prompts]), 2)
    for name, (num, den) in {"plain_exact/plain": ("plain_exact", "plain"), "auto_exact/auto": ("auto_exact", "auto"),
                             "auto/plain": ("auto", "plain"), "auto_exact/plain": ("auto_exact", "plain")}.items():
        per_prompt = {p["name"]: best[(num, p["name"])] / best[(den, p["name"])] for p in prompts}
        summary["ratios"][name] = {**{k: round(v, 3) for k, v in per_prompt.items()},
                                   "geomean": round(geomean(list(per_prompt.values())), 3)}
    summary["all_identical_to_plain"] = all(row["identical_to_plain"] for row in rows)
    summary["identical_by_arm"] = {arm: all(r["identical_to_plain"] for r in rows if r["arm"] == arm) for arm in ARMS}
    exact_rows = [r for r in rows if r["arm"].endswith("_exact")]
    summary["exact_head"] = {"rows": sum(r["head_rows"] for r in exact_rows),
                             "full_fp32_rows": sum(r["head_full_rows"] for r in exact_rows),
                             "mean_candidates": round(sum(r["head_candidates"] for r in exact_rows)
                                                      / max(sum(r["head_rows"] - r["head_full_rows"] for r in exact_rows), 1), 2)}
    summary["load_1min"] = [round(min(r["load_1min"] for r in rows), 2), round(max(r["load_1min"] for r in rows), 2)]
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
