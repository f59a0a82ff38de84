"""Profile tiered decode steps against full after one shared prefill (SmolLM2-135M).

    python benchmarks/results/small-cache/profile_tiered_step.py --length 8000 --steps 12 [--profile]

Prefills once (the recording is cached in /tmp, keyed by length, so a second run skips the
prefill), replays ``full`` and the tiered policies, then decodes ``--steps`` steps round-robin
(one step of each policy in turn), and prints median step seconds and the ratio to ``full``'s
median in the same run. With ``--profile``, also one torch.profiler trace of a tiered step and
wall time per tiered function (sketch scoring, top-k, unsketched slots, gathers, attention).
Run with PYTHONPATH pointing at another checkout to time that version.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections import defaultdict
from pathlib import Path

import torch


def recording_for(model, tokenizer, length: int):
    from tokensift.bench.replay import Recording, record_prefill
    from tokensift.bench.small_cache import prompt

    path = Path(f"/tmp/tiered_profile_recording_{model.config.model_type}_{length}.pt")
    if path.exists():
        saved = torch.load(path)
        return Recording(saved["keys"], saved["values"], saved["queries"], saved["logits"], saved["input_ids"])
    recording = record_prefill(model, prompt(tokenizer, length))
    torch.save({"keys": recording.keys, "values": recording.values, "queries": recording.queries,
                "logits": recording.logits, "input_ids": recording.input_ids}, path)
    return recording


def timed_functions():
    """Wrap the tiered step's functions with wall-clock accumulators (and profiler labels)."""
    import tokensift.policies.tiered as policy_module
    import tokensift.selection as selection
    from tokensift.storage import sketch as sketch_module
    from tokensift.storage import tiered as tiered_module
    from tokensift.storage import window as window_module

    totals: dict[str, list[float]] = defaultdict(list)

    def wrap(owner, name, label):
        original = getattr(owner, name)

        def timed(*args, **kwargs):
            start = time.perf_counter()
            with torch.profiler.record_function(label):
                result = original(*args, **kwargs)
            totals[label].append(time.perf_counter() - start)
            return result

        setattr(owner, name, timed)

    wrap(policy_module.Tiered, "read", "Tiered.read (whole sparse read)")
    wrap(policy_module.Tiered, "choose", "Tiered.choose")
    wrap(policy_module.Tiered, "choose_compiled", "Tiered.choose_compiled")
    wrap(tiered_module.TieredLayer, "unread_rows", "TieredLayer.unread_rows (tail)")
    wrap(tiered_module.TieredLayer, "sketch_logits", "TieredLayer.sketch_logits")
    wrap(sketch_module.KeySketch, "logits", "KeySketch.logits")
    wrap(tiered_module.TieredLayer, "unsketched_slots", "TieredLayer.unsketched_slots")
    wrap(tiered_module.TieredLayer, "update", "TieredLayer.update (tier write)")
    wrap(tiered_module.TieredLayer, "enforce_budget", "TieredLayer.enforce_budget")
    wrap(window_module.QuantizedWindowLayer, "update", "QuantizedWindowLayer.update (sliding layers)")
    for module in (policy_module, selection):
        for name in ("top_k", "gather_attend", "forced_mask", "to_query_heads", "reuse_read", "save_selection"):
            if hasattr(module, name):
                wrap(module, name, f"{name}")
    return totals


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--length", type=int, default=8000)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--policies", default="full;tiered(k=500);tiered(k=500,refresh=4)")
    parser.add_argument("--model", default=None, help="smollm2 (default) or gemma3")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave the default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from tokensift.bench.decode import GreedyDecoder
    from tokensift.bench.replay import replay
    from tokensift.bench.small_cache import policy_for
    from tokensift.kernels import packed_linears
    from tokensift.models import load_model

    import tokensift

    print("tokensift from", os.path.dirname(tokensift.__file__), "threads", torch.get_num_threads())
    model, tokenizer = load_model(args.model)
    expressions = args.policies.split(";")
    totals = timed_functions() if args.profile else None
    with packed_linears(model), torch.inference_mode():
        recording = recording_for(model, tokenizer, args.length)
        caches = {name: replay(model, policy_for(name, args.length), recording) for name in expressions}
        decoders = {name: GreedyDecoder(model, cache, seen=args.length) for name, cache in caches.items()}
        tokens = {name: recording.logits.argmax(-1) for name in caches}
        times: dict[str, list[float]] = {name: [] for name in caches}
        load_before = os.getloadavg()
        for step in range(args.steps):
            for name, decoder in decoders.items():
                if totals is not None and step == 1:
                    totals.clear()
                start = time.perf_counter()
                logits = decoder.feed_next(tokens[name])
                times[name].append(time.perf_counter() - start)
                tokens[name] = logits.argmax(-1)
                if totals is not None and step == 1 and name != "full":
                    print(f"\n-- {name}, step 1: wall per function (summed over {len(caches[name].layers)} layers)")
                    for label, values in sorted(totals.items(), key=lambda item: -sum(item[1])):
                        print(f"  {label:40s} {sum(values) * 1e3:8.1f} ms  calls {len(values)}")
        load_after = os.getloadavg()
        print(f"\nlength {args.length}, steps {args.steps}; load average before {load_before}, after {load_after}")
        full = statistics.median(times["full"][1:]) if "full" in times else None
        full_mean = statistics.mean(times["full"][1:]) if "full" in times else None
        for name, values in times.items():
            step, mean = statistics.median(values[1:]), statistics.mean(values[1:])  # the first step pays one-off costs
            ratio = f"{full / step:.2f}x full (median), {full_mean / mean:.2f}x (mean)" if full else ""
            print(f"  {name:28s} median {step * 1e3:7.1f} ms, mean {mean * 1e3:7.1f} ms  {ratio}   "
                  f"steps(ms) {[round(v * 1e3) for v in values]}")
        if args.profile:
            from torch.profiler import ProfilerActivity, profile

            for name in expressions:
                if name == "full":
                    continue
                with profile(activities=[ProfilerActivity.CPU]) as prof:
                    logits = decoders[name].feed_next(tokens[name])
                tokens[name] = logits.argmax(-1)
                print(f"\n-- torch.profiler, one step of {name}")
                print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=40))
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                decoders["full"].feed_next(tokens["full"])
            print("\n-- torch.profiler, one step of full")
            print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=20))


if __name__ == "__main__":
    main()
