"""Time one decode step of the engine (SmolLM2, one thread count), for before/after comparisons.

Runs in whatever tokensift ``import tokensift`` finds (PYTHONPATH selects a checkout), so two
checkouts can be timed alternately on the same machine. Prints one JSON line per policy:
the median (and the fastest) seconds of a 1-token decode step after a ``--context``-token prefill.

    python benchmarks/engine_step.py --context 1024 --steps 64 --policies full,snapkv
"""

import argparse
import json
import statistics
import time

import torch

from tokensift.models import load_model
from tokensift.policies import build_policy

try:
    from tokensift.engine import make_cache
except ImportError:  # checkouts from before the engine module
    from tokensift.cache import make_cache


def step_seconds(model, policy, context: int, steps: int) -> list[float]:
    ids = torch.randint(100, 40000, (1, context), generator=torch.Generator().manual_seed(0))
    cache = make_cache(model, policy)
    with torch.inference_mode():
        logits = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1).logits
        times = []
        for _ in range(steps):
            token = logits[:, -1].argmax(-1, keepdim=True)
            start = time.perf_counter()
            logits = model(input_ids=token, past_key_values=cache, use_cache=True, logits_to_keep=1).logits
            times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--policies", default="full,snapkv")
    parser.add_argument("--label", default="")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, _ = load_model()
    for name in args.policies.split(","):
        policy = build_policy(name) if name == "full" else build_policy(name, budget=256)
        times = step_seconds(model, policy, args.context, args.steps)
        print(json.dumps({"label": args.label, "policy": name, "context": args.context,
                          "median_step_s": statistics.median(times[4:]), "min_step_s": min(times[4:])}), flush=True)


if __name__ == "__main__":
    main()
