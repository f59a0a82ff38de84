"""Issue 19 diagnosis: where do gemfilter / lazyllm lose the niah needle?

For each niah instance (the ttft suite's: seed 0, query_aware, same index) this script
  1. runs the decoder once on the whole prompt and records, at every layer, each head's softmax
     attention of the last 16 prompt tokens over the prompt; from it, the rank of the needle's
     value digits and of its key sentence under four scores (mean / max over heads x last 1 /
     last 16 rows), against the gemfilter budget (top_k minus the protected sliding window);
  2. prefills the subset chosen by several selections (the default, the oracle = needle sentence
     + the rest of the default top_k, top_k = half the prompt, variants) through GemFilter.run
     itself (only ``select`` replaced) and decodes the answer as the suite does;
  3. runs lazyllm with its stage choices logged (needle digits surviving each stage) and decodes.

    OMP_NUM_THREADS=2 python benchmarks/results/ttft/diagnosis/needle_rank.py --model smollm2 \
        --length 4096 --indices 0,1,2,3 --out benchmarks/results/ttft/diagnosis/smollm2-4k.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import torch

from tokensift import attention
from tokensift.bench.tasks import build_instances
from tokensift.bench.ttft_suite import answer
from tokensift.engine import make_cache
from tokensift.kernels import packed_linears
from tokensift.models import load_model
from tokensift.policies import build_policy
from tokensift.prefill import subset as sub
from tokensift.prefill.full import FullPrefill
from tokensift.prefill.gemfilter import GemFilter, filter_layer
from tokensift.prefill.lazyllm import LazyLLM, score_layer
from tokensift.prefill.base import keep_count

ROWS = 16


def char_to_token(tokenizer, ids, char):
    """Smallest m such that decode(ids[:m]) is longer than ``char``: token m-1 covers char."""
    lo, hi = 1, len(ids)
    while lo < hi:
        mid = (lo + hi) // 2
        if len(tokenizer.decode(ids[:mid])) > char:
            hi = mid
        else:
            lo = mid + 1
    return lo - 1


def needle_positions(tokenizer, instance):
    ids = instance.context_ids
    text = tokenizer.decode(ids)
    key, value = instance.meta["key"], instance.answers[0]
    sentence = f"The special magic number for {key} is {value}."
    start = text.index(sentence)
    assert text.count(sentence) == 1
    vstart = start + sentence.index(value)
    first = char_to_token(tokenizer, ids, start)
    vfirst = char_to_token(tokenizer, ids, vstart)
    vlast = char_to_token(tokenizer, ids, vstart + len(value) - 1)
    last = char_to_token(tokenizer, ids, start + len(sentence) - 1)
    return list(range(vfirst, vlast + 1)), list(range(first, vfirst)), list(range(first, last + 1))


class Recorder:
    """Per layer: [heads, ROWS, n] softmax attention of the last ROWS queries (causal among them)."""

    def __init__(self, layers):
        self.layers, self.att = set(layers), {}

    def __call__(self, module, query, key, scaling):
        index = module.layer_idx
        if index not in self.layers:
            return
        scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
        _, heads, n, dim = query.shape
        kv_heads = key.shape[1]
        k = key[0].float().repeat_interleave(heads // kv_heads, dim=0)  # [heads, n, d]
        q = query[0, :, -ROWS:].float()  # [heads, ROWS, d]
        logits = q @ k.transpose(-1, -2) * scaling
        later = torch.arange(n)[None, :] > (n - ROWS + torch.arange(ROWS))[:, None]
        self.att[index] = logits.masked_fill(later, float("-inf")).softmax(-1)


def score_variants(att):
    """name -> [n] score."""
    return {
        "mean_h,last1": att[:, -1].mean(0),
        "max_h,last1": att[:, -1].max(0).values,
        "mean_h,last16": att.mean((0, 1)),
        "max_h,last16": att.mean(1).max(0).values,
    }


def ranks(score, positions, candidates):
    """0-based rank of each position among the candidate (unprotected) tokens."""
    s = score[:candidates]
    order = torch.argsort(s, descending=True)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(len(order))
    return [int(rank[p]) if p < candidates else -1 for p in positions]


def with_neighbours(score, keep, protect, radius):
    """Top tokens expanded by +-radius until ``keep`` are chosen (protected tail always)."""
    n = score.numel()
    chosen = torch.zeros(n, dtype=torch.bool)
    chosen[-protect:] = True
    for p in torch.argsort(score[:n - protect], descending=True).tolist():
        if chosen.sum() >= keep:
            break
        chosen[max(0, p - radius):min(n, p + radius + 1)] = True
    return chosen.nonzero().flatten()


def top_plus(score, keep, protect, forced):
    """``forced`` positions + the default top tokens to fill ``keep``."""
    s = score.clone()
    s[torch.tensor(forced)] = float("inf")
    return sub.top_tokens(s, keep, protect)


class Fixed(GemFilter):
    def __init__(self, positions, **kw):
        super().__init__(**kw)
        self.positions = positions

    def select(self, model, ids, source):
        return self.positions


def decode_with(model, tokenizer, instance, prefill):
    cache = make_cache(model, build_policy("full"))
    ids = torch.tensor([instance.context_ids])
    prefill.run(model, cache, ids)
    score, _, tokens = answer(model, cache, instance, tokenizer)
    return score, tokenizer.decode(tokens, skip_special_tokens=True).strip()[:40]


def lazyllm_trace(model, tokenizer, instance, value_pos):
    """LazyLLM.run with each stage's survivors logged (how many value digits survive)."""
    policy = LazyLLM()
    total = len(instance.context_ids)
    stages = policy.schedule(model)
    sources = {layer: score_layer(model, layer) for layer in stages}
    protect = max(policy.recent + 1, sub.sliding_window(model))
    subset = sub.Subset(torch.arange(total), total)
    watch = sub.ScoreWatch(set(sources.values()), subset, policy.rows)
    log = []

    def choose(layer, current):
        scores = watch.scores[sources[layer]].index_select(0, current.positions)
        kept = sub.top_tokens(scores, keep_count(stages[layer], total), protect)
        survivors = set(current.positions.index_select(0, kept).tolist())
        log.append({"stage_layer": layer, "score_layer": sources[layer], "keep": len(kept),
                    "value_digits_kept": sum(p in survivors for p in value_pos)})
        return kept

    cache = make_cache(model, build_policy("full"))
    ids = torch.tensor([instance.context_ids])
    cutter = sub.LayerCutter(model, subset, set(stages), choose)
    with sub.subset_prefill(cache, subset), sub.watching(watch), cutter.installed():
        model(input_ids=ids, attention_mask=torch.ones_like(ids), past_key_values=cache, use_cache=True,
              logits_to_keep=1)
    score, _, tokens = answer(model, cache, instance, tokenizer)
    return log, score, tokenizer.decode(tokens, skip_special_tokens=True).strip()[:40]


@torch.inference_mode()
def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--indices", default="0,1,2,3")
    parser.add_argument("--top-k", type=int, default=1024)
    parser.add_argument("--out", required=True)
    parser.add_argument("--no-lazyllm", action="store_true")
    parser.add_argument("--quick", action="store_true", help="only default, oracle, n/2 and the late max_h last16 runs")
    args = parser.parse_args()
    model, tokenizer = load_model(args.model)
    depth = len(sub.decoder_layers(model))
    kinds = sub.layer_types(model)
    protect = max(1, sub.sliding_window(model))
    score_layers = [i for i in range(depth) if kinds[i] == "full_attention"]
    default_layer = filter_layer(model, sub.layer_index(0.4, depth, "gemfilter"))
    late_layer = filter_layer(model, sub.layer_index(0.7, depth, "gemfilter"))
    indices = [int(i) for i in args.indices.split(",")]
    instances = build_instances("niah", tokenizer, args.length, max(indices) + 1, 0, "query_aware")
    results = []
    with packed_linears(model):
        for index in indices:
            inst = instances[index]
            n = len(inst.context_ids)
            value_pos, key_pos, sentence_pos = needle_positions(tokenizer, inst)
            assert tokenizer.decode([inst.context_ids[p] for p in value_pos]).strip() == inst.answers[0]
            t0 = time.time()
            recorder = Recorder(score_layers)
            attention.PREFILL_WATCH[0] = recorder
            try:
                model.get_decoder()(input_ids=torch.tensor([inst.context_ids]), use_cache=False)
            finally:
                attention.PREFILL_WATCH[0] = None
            row = {"index": index, "depth": inst.meta["depth"], "tokens": n, "value_pos": value_pos,
                   "sentence_pos": [sentence_pos[0], sentence_pos[-1]], "budget": args.top_k - protect,
                   "forward_s": round(time.time() - t0, 1), "ranks": {}, "runs": {}}
            candidates = n - protect  # the protected tail (the last token, or the sliding window) is always kept
            for layer in score_layers:
                for name, score in score_variants(recorder.att[layer]).items():
                    vr, kr = ranks(score, value_pos, candidates), ranks(score, key_pos, candidates)
                    row["ranks"][f"L{layer} {name}"] = {"value_best": min(vr), "value_worst": max(vr),
                                                        "key_best": min(kr), "key_median": sorted(kr)[len(kr) // 2]}
            # sanity: the recorded default score gives gemfilter's own selection
            default = score_variants(recorder.att[default_layer])["mean_h,last1"]
            mine = sub.top_tokens(default, args.top_k, protect)
            if index == indices[0]:
                theirs = GemFilter().select(model, torch.tensor([inst.context_ids]), default_layer)
                row["selection_matches_gemfilter"] = len(set(mine.tolist()) ^ set(theirs.tolist()))
            late = score_variants(recorder.att[late_layer])
            selections = {
                "default (L%d mean_h last1)" % default_layer: mine,
                "oracle: needle sentence + default top_k": top_plus(default, args.top_k, protect, sentence_pos),
                "top_k = n/2 (default score)": sub.top_tokens(default, n // 2, protect),
                "L%d max_h last1" % default_layer: sub.top_tokens(score_variants(recorder.att[default_layer])["max_h,last1"], args.top_k, protect),
                "L%d max_h last16" % default_layer: sub.top_tokens(score_variants(recorder.att[default_layer])["max_h,last16"], args.top_k, protect),
                "L%d mean_h last16" % late_layer: sub.top_tokens(late["mean_h,last16"], args.top_k, protect),
                "L%d max_h last16" % late_layer: sub.top_tokens(late["max_h,last16"], args.top_k, protect),
                "default score, +-2 neighbours": with_neighbours(default, args.top_k, protect, 2),
                "L%d max_h last16, +-2 neighbours" % late_layer: with_neighbours(late["max_h,last16"], args.top_k, protect, 2),
            }
            if args.quick:
                selections = {k: v for i, (k, v) in enumerate(selections.items()) if i in (0, 1, 2, 6)}
            for name, positions in selections.items():
                kept = set(positions.tolist())
                t1 = time.time()
                score, text = decode_with(model, tokenizer, inst, Fixed(positions))
                row["runs"][name] = {"kept": len(kept), "value_digits_kept": sum(p in kept for p in value_pos),
                                     "sentence_kept": sum(p in kept for p in sentence_pos), "of": len(sentence_pos),
                                     "score": score, "answer": text, "s": round(time.time() - t1, 1)}
                print(index, name, row["runs"][name], flush=True)
            # the oracle subset as a fresh, contiguous prompt (positions 0..k-1, full prefill): does
            # the model answer from those tokens at all, without the true-position gaps?
            oracle = selections["oracle: needle sentence + default top_k"]
            short = dataclasses.replace(inst, context_ids=[inst.context_ids[p] for p in oracle.tolist()])
            t1 = time.time()
            score, text = decode_with(model, tokenizer, short, FullPrefill())
            row["runs"]["oracle tokens as a contiguous prompt (full prefill)"] = {
                "kept": len(oracle), "value_digits_kept": len(value_pos), "sentence_kept": len(sentence_pos),
                "of": len(sentence_pos), "score": score, "answer": text, "s": round(time.time() - t1, 1)}
            print(index, "compact", row["runs"]["oracle tokens as a contiguous prompt (full prefill)"], flush=True)
            if not args.no_lazyllm:
                log, score, text = lazyllm_trace(model, tokenizer, inst, value_pos)
                row["lazyllm"] = {"stages": log, "score": score, "answer": text}
                print(index, "lazyllm", row["lazyllm"], flush=True)
            results.append(row)
            with open(args.out, "w") as f:
                json.dump({"model": args.model, "length": args.length, "top_k": args.top_k, "protect": protect,
                           "score_layers": score_layers, "default_layer": default_layer, "late_layer": late_layer,
                           "instances": results}, f, indent=1)
            print(f"instance {index} done in {time.time() - t0:.0f}s", flush=True)


if __name__ == "__main__":
    main()
