"""Losslessness on real prompts: speculative greedy == transformers' plain greedy, token for token,
on the embedded SmolLM2 over >= 100 distinct prompts of the spec suite (HumanEval code, essay
summaries, essay QA, chat, copying), cycling drafters and tree sizes.

    .venv/bin/python benchmarks/spec_lossless_real.py [--per-category 24] [--tokens 32] [--out FILE]

Prints one JSON line per prompt and a summary; exit status 1 if any output differs.
docs/RELIABILITY.md records the figure of the last run.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time

import torch


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--per-category", type=int, default=24)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    from tokensift.bench.spec_suite import spec_prompts
    from tokensift.models import load_model
    from tokensift.speculative import CostModel, Speculator

    torch.manual_seed(0)
    model, tokenizer = load_model()
    distinct = list({p["text"]: p for p in spec_prompts(tokenizer, args.per_category)}.values())
    by_category = {}
    for prompt in distinct:
        by_category.setdefault(prompt["category"], []).append(prompt)
    # categories interleaved, so a run stopped early still covers every one
    prompts = [p for group in itertools.zip_longest(*by_category.values()) for p in group if p is not None]
    # adaptive trees with a cheap synthetic cost (they draft a lot), and fixed sizes; state carried across prompts
    variants = [("auto", None), ("recycling", 12), ("prompt_lookup", 6), ("lookahead", 24), ("auto", 40)]
    speculators = {v: Speculator(model, v[0], fixed_nodes=v[1], cost=CostModel.synthetic(0.05) if v[1] is None else None)
                   for v in variants}
    records, started = [], time.perf_counter()
    for prompt, variant in zip(prompts, itertools.cycle(variants)):
        ids = tokenizer(prompt["text"])["input_ids"]
        with torch.inference_mode():
            plain = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                   max_new_tokens=args.tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id)
        plain = plain[0, len(ids):].tolist()
        result = speculators[variant].generate(tokenizer, ids, max_new_tokens=args.tokens)
        record = {"name": prompt["name"], "category": prompt["category"], "drafter": variant[0], "nodes": variant[1],
                  "prompt_tokens": len(ids), "new_tokens": len(plain), "steps": result.steps,
                  "identical": result.token_ids == plain}
        records.append(record)
        print(json.dumps(record), flush=True)
    identical = sum(r["identical"] for r in records)
    summary = {"prompts": len(records), "identical": identical, "tokens": sum(r["new_tokens"] for r in records),
               "steps": sum(r["steps"] for r in records), "seconds": round(time.perf_counter() - started, 1)}
    print(json.dumps({"summary": summary}), flush=True)
    if args.out:
        with open(args.out, "w") as handle:
            json.dump({"summary": summary, "records": records}, handle, indent=1)
    return 0 if identical == len(records) else 1


if __name__ == "__main__":
    sys.exit(main())
