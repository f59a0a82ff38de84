"""Issue 22: how much of the suite's acceptance comes from the drafter state its process carries
from earlier prompts? Tokens per step (a property of drafting, not of timing noise) of one
prompt with a fresh Speculator, after a prompt of the same category, and after a code prompt.

    OMP_NUM_THREADS=1 python benchmarks/spec_state_carry.py summ-1:summ-0 qa-1:qa-0 chat-1:chat-0
"""

import json
import os
import sys


def main(pairs):
    from tokensift.bench.spec_suite import spec_prompts
    from tokensift.models import load_model
    from tokensift.speculative import Speculator

    model, tokenizer = load_model(None)
    table = {p["name"]: p["text"] for p in spec_prompts(tokenizer, 4)}
    for pair in pairs:
        target, before = pair.split(":")
        row = {"prompt": target, "load": os.getloadavg()[0]}
        for arm, warmup in (("fresh", None), (f"after {before}", before), ("after humaneval-0", "humaneval-0")):
            spec = Speculator(model, "auto")
            if warmup:
                spec.generate(tokenizer, table[warmup], max_new_tokens=128)
            result = spec.generate(tokenizer, table[target], max_new_tokens=128)
            row[arm] = {"tokens_per_step": round(result.accepted_per_step, 3), "draft_nodes_per_step": round(result.mean_tree_nodes, 2),
                        "accepted_by_drafter": result.accepted_by_drafter}
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
