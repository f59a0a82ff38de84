"""Run NVIDIA kvpress presses on tokensift task instances (standalone worker script).

This file runs inside the kvpress virtualenv (old transformers pinned by kvpress) and must not
import tokensift. It reads a job json::

    {"instances": "tasks.jsonl", "out": "rows.jsonl", "gguf": "/path/model.gguf",
     "tokenizer": "/optional/tokenizer/dir", "threads": 2,
     "runs": [{"press": "snapkv", "keep_ratio": 0.125, "compression_ratio": 0.875}, ...]}

and writes one jsonl row per (instance, run). Protocol (query-agnostic, as kvpress's pipeline
does "context then question"): the context ids are prefilled by the base model with the press
active, so the cache is compressed; then the suffix ids are fed at their true positions and
``max_new_tokens`` are greedy-decoded over the compressed cache. Instances with
``max_new_tokens == 0`` (perplexity streams) get the negative log-likelihood of their suffix
instead. A press that fails is recorded with its error; the run goes on.

Usage: python kvpress_worker.py JOB.json
"""

from __future__ import annotations

import json
import sys
import time
import traceback
from pathlib import Path

import torch

NEEDS_EAGER = {"observed_attention"}


def press_factories() -> dict:
    """Press name -> function(compression_ratio) building the kvpress press."""
    import kvpress as kp

    return {
        "full": lambda ratio: None,
        "snapkv": lambda ratio: kp.SnapKVPress(compression_ratio=ratio),
        "streaming_llm": lambda ratio: kp.StreamingLLMPress(compression_ratio=ratio),
        "tova": lambda ratio: kp.TOVAPress(compression_ratio=ratio),
        "knorm": lambda ratio: kp.KnormPress(compression_ratio=ratio),
        "observed_attention": lambda ratio: kp.ObservedAttentionPress(compression_ratio=ratio),
        "expected_attention": lambda ratio: kp.ExpectedAttentionPress(compression_ratio=ratio),
        "pyramidkv": lambda ratio: kp.PyramidKVPress(compression_ratio=ratio),
        "adakv_snapkv": lambda ratio: kp.AdaKVPress(kp.SnapKVPress(compression_ratio=ratio)),
        "adakv_expected_attention": lambda ratio: kp.AdaKVPress(
            kp.ExpectedAttentionPress(compression_ratio=ratio)
        ),
    }


def load_model(gguf: Path, tokenizer_dir: str | None):
    """The model (fp32, CPU, SDPA) and tokenizer, read from the GGUF file."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32, attn_implementation="sdpa"
    ).eval()
    if tokenizer_dir:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    else:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    return model, tokenizer


def prefill(model, press, context_ids: list[int]):
    """Run the base model over the context with the press active; return the cache."""
    from transformers import DynamicCache

    cache = DynamicCache()
    ids = torch.tensor([context_ids])
    if press is None:
        model.model(input_ids=ids, past_key_values=cache)
    else:
        with press(model):
            model.model(input_ids=ids, past_key_values=cache)
    return cache


def kept_tokens(model, cache) -> tuple[float, float]:
    """Mean cached tokens per layer: stored, and effective (minus AdaKV's masked keys)."""
    stored, effective = [], []
    for index, layer in enumerate(model.model.layers):
        length = cache.layers[index].keys.shape[2]
        masked = getattr(layer.self_attn, "masked_key_indices", None)
        heads = cache.layers[index].keys.shape[1]
        hidden = len(masked[0]) / heads if masked is not None else 0.0
        stored.append(length)
        effective.append(length - hidden)
    return sum(stored) / len(stored), sum(effective) / len(effective)


def greedy_after_suffix(model, cache, context_len: int, suffix_ids: list[int], max_new: int, stop_ids):
    """Feed the suffix at its true positions, then greedy-decode over the compressed cache."""
    positions = torch.arange(context_len, context_len + len(suffix_ids)).unsqueeze(0)
    out = model(input_ids=torch.tensor([suffix_ids]), past_key_values=cache, position_ids=positions,
                logits_to_keep=1)
    generated = [int(out.logits[0, -1].argmax())]
    next_position = context_len + len(suffix_ids)
    while len(generated) < max_new and generated[-1] not in stop_ids:
        out = model(input_ids=torch.tensor([[generated[-1]]]), past_key_values=cache,
                    position_ids=torch.tensor([[next_position]]))
        generated.append(int(out.logits[0, -1].argmax()))
        next_position += 1
    return generated


def suffix_nll(model, cache, context_len: int, suffix_ids: list[int]) -> list[float]:
    """Negative log-likelihood of each suffix token after the first, given the compressed cache.

    The first suffix token is predicted by the prefill's last position, which runs without the
    lm head here, so it is left out.
    """
    positions = torch.arange(context_len, context_len + len(suffix_ids)).unsqueeze(0)
    out = model(input_ids=torch.tensor([suffix_ids]), past_key_values=cache, position_ids=positions)
    log_probs = torch.log_softmax(out.logits[0, :-1].float(), dim=-1)
    targets = torch.tensor(suffix_ids[1:])
    return (-log_probs.gather(1, targets.unsqueeze(1)).squeeze(1)).tolist()


def stop_token_ids(model) -> set[int]:
    """The model's end-of-sequence ids."""
    eos = model.generation_config.eos_token_id
    return set(eos if isinstance(eos, list) else [eos] if eos is not None else [])


def run_one(model, tokenizer, instance: dict, run: dict, factories: dict) -> dict:
    """One (instance, press, ratio) row; errors become a row with ``status: error``."""
    row = {
        "key": instance_key(instance),
        "task": instance["task"],
        "press": run["press"],
        "keep_ratio": run["keep_ratio"],
        "compression_ratio": run["compression_ratio"],
        "context_tokens": len(instance["context_ids"]),
    }
    try:
        row.update(measure(model, tokenizer, instance, run, factories))
        row["status"] = "ok"
    except Exception as error:  # one press failing must not end the run
        row["status"] = "error"
        row["error"] = one_line(error)
        row["traceback_tail"] = traceback.format_exc().strip().splitlines()[-3:]
    return row


def one_line(error: Exception) -> str:
    """``Type: first line of the message``."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}"


def measure(model, tokenizer, instance: dict, run: dict, factories: dict) -> dict:
    """Prefill with the press, then decode (or score the suffix); timings and kept tokens."""
    if run["press"] not in factories:
        raise KeyError(f"unknown press {run['press']!r}")
    press = factories[run["press"]](run["compression_ratio"])
    set_attention(model, "eager" if run["press"] in NEEDS_EAGER else "sdpa")
    context, suffix = instance["context_ids"], instance["suffix_ids"]
    with torch.no_grad():
        start = time.perf_counter()
        cache = prefill(model, press, context)
        prefill_s = time.perf_counter() - start
        stored, effective = kept_tokens(model, cache)
        set_attention(model, "sdpa")
        start = time.perf_counter()
        result = decode_or_score(model, tokenizer, cache, instance)
        result["decode_s"] = round(time.perf_counter() - start, 3)
    result.update(prefill_s=round(prefill_s, 3), kv_tokens_kept=stored, kv_tokens_effective=effective)
    return result


def decode_or_score(model, tokenizer, cache, instance: dict) -> dict:
    """Greedy answer for a generation task, suffix NLL for a perplexity stream."""
    context_len, suffix = len(instance["context_ids"]), instance["suffix_ids"]
    if instance["max_new_tokens"] == 0:
        nll = suffix_nll(model, cache, context_len, suffix)
        return {"suffix_nll": nll, "mean_nll": sum(nll) / len(nll)}
    ids = greedy_after_suffix(model, cache, context_len, suffix, instance["max_new_tokens"],
                              stop_token_ids(model))
    return {"generated_ids": ids, "generated_text": tokenizer.decode(ids, skip_special_tokens=True)}


def set_attention(model, implementation: str) -> None:
    """Switch the attention implementation (ObservedAttention needs eager weights)."""
    if model.config._attn_implementation != implementation:
        model.set_attn_implementation(implementation)


def instance_key(instance: dict) -> str:
    """The same key tokensift's TaskInstance.key gives."""
    return "/".join(str(instance[k]) for k in ("task", "protocol", "length", "seed", "index"))


def versions() -> dict:
    """Versions of the libraries that produced the rows."""
    import importlib.metadata as md

    return {name: md.version(name) for name in ("kvpress", "transformers", "torch")}


def main(job_path: str) -> int:
    """Run every (instance, run) pair of the job and append rows to its output file."""
    job = json.loads(Path(job_path).read_text())
    torch.set_num_threads(int(job.get("threads", 2)))
    instances = [json.loads(line) for line in Path(job["instances"]).read_text().splitlines() if line.strip()]
    started = time.perf_counter()
    model, tokenizer = load_model(Path(job["gguf"]), job.get("tokenizer"))
    factories = press_factories()
    stamp = {**versions(), "load_s": round(time.perf_counter() - started, 1)}
    print(json.dumps({"event": "loaded", **stamp}), flush=True)
    with open(job["out"], "a") as out:
        for instance in instances:
            for run in job["runs"]:
                row = {**run_one(model, tokenizer, instance, run, factories), "versions": stamp}
                out.write(json.dumps(row) + "\n")
                out.flush()
                print(json.dumps({k: row.get(k) for k in ("key", "press", "keep_ratio", "status", "error")}),
                      flush=True)
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        print("usage: python kvpress_worker.py JOB.json", file=sys.stderr)
        sys.exit(2)
    sys.exit(main(sys.argv[1]))
