"""Issue 22, diagnosis: why does `generate --speculate auto` in a fresh process gain less than
the spec suite? One prompt per call; run as

    python benchmarks/spec_fresh_diag.py --prompt NAME --arm ARM --tokens 128

Arms: ``plain`` (tokensift's plain decoding, as `tokensift generate`), ``cold`` (a fresh
Speculator in a fresh process; ``packed0``: the same with no drafts, packed kernels only, as `tokensift generate --speculate auto`), ``cold256`` (the same
with 256 new tokens: the rate of the last 128), ``warm:PARTS`` (first a warm-up generation on
other prompts, like the suite's earlier prompts, then a fresh Speculator given the warm one's
PARTS: ``none`` (kernels/JIT warm only), ``table``, ``stats``, ``trie``, ``cost``, ``all``;
several arms can run in one process: ``warm:none,table,stats,trie,cost,all``). Prints JSON lines.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch


def prompts(tokenizer):
    from tokensift.bench.spec_suite import spec_prompts

    return {p["name"]: p for p in spec_prompts(tokenizer, 4)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--arm", required=True)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--warmup", default="humaneval-0,summ-0,qa-0,chat-0")
    parser.add_argument("--warmup-tokens", type=int, default=64)
    args = parser.parse_args()

    from tokensift.generate import generate
    from tokensift.models import load_model
    from tokensift.speculative import Speculator

    model, tokenizer = load_model(None)
    table = prompts(tokenizer)
    text = table[args.prompt]["text"]

    def emit(arm, result, tokens, extra=None):
        rec = {"prompt": args.prompt, "category": table[args.prompt]["category"], "arm": arm,
               "tokens_per_second": result.tokens_per_second, "new_tokens": result.new_tokens,
               "token_ids": result.token_ids if hasattr(result, "token_ids") else None,
               "load": round(os.getloadavg()[0], 2), "threads": torch.get_num_threads(), **(extra or {})}
        if hasattr(result, "steps"):
            rec.update(steps=result.steps, accepted_per_step=result.accepted_per_step,
                       mean_tree_nodes=result.mean_tree_nodes, accepted_by_drafter=result.accepted_by_drafter)
        print(json.dumps(rec), flush=True)

    if args.arm == "plain":
        result = generate(model, tokenizer, text, max_new_tokens=args.tokens)
        rec_ids = result.token_ids[0] if result.token_ids and isinstance(result.token_ids[0], list) else result.token_ids
        result.token_ids = rec_ids
        emit("plain", result, args.tokens)
        return
    if args.arm == "packed0":  # tokensift's loop, packed kernels, no drafts
        emit("packed0", Speculator(model, "auto", fixed_nodes=0).generate(tokenizer, text, max_new_tokens=args.tokens), args.tokens)
        return
    if args.arm in ("cold", "cold256"):
        spec = Speculator(model, "auto")
        if args.arm == "cold":
            emit("cold", spec.generate(tokenizer, text, max_new_tokens=args.tokens), args.tokens)
            return
        times = []
        result = spec.generate(tokenizer, text, max_new_tokens=2 * args.tokens,
                               on_token=lambda t: times.append(time.perf_counter()))
        half = len(times) // 2
        late = (len(times) - half) / (times[-1] - times[half - 1]) if len(times) > half + 1 else float("nan")
        early = (half - 1) / (times[half - 1] - times[0]) if half > 1 else float("nan")
        emit("cold256", result, 2 * args.tokens, {"first_half_tps": early, "second_half_tps": late})
        return
    parts_list = args.arm.removeprefix("warm:").split(",")
    warm = Speculator(model, "auto")
    for name in args.warmup.split(","):
        if name != args.prompt:
            warm.generate(tokenizer, table[name]["text"], max_new_tokens=args.warmup_tokens)
    for parts in parts_list:
        spec = Speculator(model, "auto")
        if parts in ("table", "all"):
            spec.drafter("recycling").adjacency = warm.drafter("recycling").adjacency.copy()
        if parts in ("stats", "all"):
            spec.stats.table = {k: list(v) for k, v in warm.stats.table.items()}
        if parts in ("trie", "all"):
            import copy
            spec.drafter("lookahead").tries = copy.deepcopy(warm.drafter("lookahead").tries)
        if parts in ("cost", "all"):
            import copy
            spec.cost = copy.deepcopy(warm.cost)
        emit(f"warm:{parts}", spec.generate(tokenizer, text, max_new_tokens=args.tokens), args.tokens)


if __name__ == "__main__":
    main()
