"""Issue 22: do the packed kernels keep their gain on a loaded machine? One process, 1 thread:
decode steps (q = 1, 4, 8 tokens over a 300-token cache) alternate between stock (MKL) and
packed (oneDNN) linears; each step's wall time and the thread's CPU time are recorded, so the
ratio with and without the waiting for a core can be compared. Prints JSON.

    OMP_NUM_THREADS=1 python benchmarks/kernel_load_probe.py
"""

import json
import os
import statistics
import time

import torch

torch.set_num_threads(1)


def main(rounds: int = 12):
    from tokensift.engine import make_cache
    from tokensift.kernels import packed_linears
    from tokensift.models import load_model
    from tokensift.policies import build_policy
    from tokensift.speculative.tree import DraftTree

    model, _ = load_model(None)
    ids = torch.randint(10, 40000, (1, 400), generator=torch.Generator().manual_seed(0))
    times = {}
    load_before = os.getloadavg()
    with torch.inference_mode():
        cache = make_cache(model, build_policy("full"))
        model.model(input_ids=ids[:, :300], past_key_values=cache, use_cache=True)
        for r in range(rounds + 1):
            for packed in (False, True):
                with packed_linears(model, packed):
                    for q in (1, 4, 8):
                        tree = DraftTree.chain(int(ids[0, 300]), ids[0, 301:300 + q].tolist())
                        mask = tree.attention_mask(300) if q > 1 else None
                        w, c = time.perf_counter(), time.thread_time()
                        h = model.model(input_ids=ids[:, 300:300 + q], attention_mask=mask, position_ids=tree.position_ids(300),
                                        past_key_values=cache, use_cache=True).last_hidden_state
                        model.lm_head(h)
                        wall, cpu = time.perf_counter() - w, time.thread_time() - c
                        cache.keep_new_tokens(q, [])
                        if r:  # round 0 warms up
                            times.setdefault(("packed" if packed else "stock", q), []).append((wall, cpu))
    out = {"load_before": load_before, "load_after": os.getloadavg(), "rounds": rounds, "median_ms": {}}
    for (kind, q), values in times.items():
        out["median_ms"][f"{kind} q={q}"] = {"wall": round(statistics.median(v[0] for v in values) * 1000, 1),
                                             "cpu": round(statistics.median(v[1] for v in values) * 1000, 1)}
    m = out["median_ms"]
    out["stock_over_packed_q1"] = {k: round(m["stock q=1"][k] / m["packed q=1"][k], 2) for k in ("wall", "cpu")}
    out["packed_q8_over_q1"] = {k: round(m["packed q=8"][k] / m["packed q=1"][k], 2) for k in ("wall", "cpu")}
    out["packed_q4_over_q1"] = {k: round(m["packed q=4"][k] / m["packed q=1"][k], 2) for k in ("wall", "cpu")}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
