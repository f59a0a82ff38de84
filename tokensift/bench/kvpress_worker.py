"""Run NVIDIA kvpress presses on tokensift task instances (standalone worker script).

This file runs inside the kvpress virtualenv (old transformers pinned by kvpress) and must not
import tokensift. It reads a job json::

    {"instances": "tasks.jsonl", "out": "rows.jsonl", "gguf": "/path/model.gguf",
     "tokenizer": "/optional/tokenizer/dir", "threads": 2, "device": "cuda:0", "dtype": "bfloat16",
     "runs": [{"press": "snapkv", "keep_ratio": 0.125, "compression_ratio": 0.875}, ...]}

and writes one jsonl row per (instance, run). Protocol (query-agnostic, as kvpress's pipeline
does "context then question"): the context ids are prefilled by the base model with the press
active, so the cache is compressed; then the suffix ids are fed at their true positions and
``max_new_tokens`` are greedy-decoded over the compressed cache. Instances with
``max_new_tokens == 0`` (perplexity streams) get the negative log-likelihood of their suffix
instead. A press that fails is recorded with its error; the run goes on.

One prefill serves every press of an instance: a press compresses a layer's cache in a hook
*after* that layer's attention, so the layers above it see the uncompressed output whatever
the press does. At each layer every press compresses its own copy of that layer's keys and
values, with the same arguments its own hook would get (``"separate": true`` in the job runs
one prefill per press through kvpress's own hook instead, to check this).

Usage: python kvpress_worker.py JOB.json
"""

from __future__ import annotations

import json
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import torch

NEEDS_EAGER = {"observed_attention"}


def clock(device) -> float:
    """``time.perf_counter()`` once the device's queued work is done (CUDA runs asynchronously)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


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


def load_model(gguf: Path, tokenizer_dir: str | None, device: str | None = None, dtype: str | None = None):
    """The model (SDPA; where and in what the job says: ``device``/``dtype``, default fp32 where
    transformers loads it) and tokenizer, read from the GGUF file."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=getattr(torch, dtype) if dtype else torch.float32, attn_implementation="sdpa"
    )
    model = (model.to(device) if device else model).eval()
    if tokenizer_dir:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    else:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    return model, tokenizer


def prefill(model, press, context_ids: list[int]):
    """Run the base model over the context with the press active; return the cache."""
    from transformers import DynamicCache

    cache = DynamicCache()
    ids = torch.tensor([context_ids], device=model.device)
    if press is None:
        model.model(input_ids=ids, past_key_values=cache)
    else:
        with press(model):
            model.model(input_ids=ids, past_key_values=cache)
    return cache


@dataclass
class Compressed:
    """One press's result of a shared prefill: its cache, AdaKV's masked keys per layer, its
    compression seconds, and the error that stopped it (if any)."""

    cache: object
    masks: dict = field(default_factory=dict)
    compress_s: float = 0.0
    error: str | None = None
    trace: list = field(default_factory=list)


def compress_in_one_prefill(model, presses: list, context_ids: list[int]) -> tuple[list[Compressed], float]:
    """Prefill once; at every attention layer each press (None = keep all) compresses its own
    copy of the layer's keys and values. Returns one :class:`Compressed` per press and the
    prefill seconds."""
    from transformers import DynamicCache

    from kvpress.utils import extract_keys_and_values

    results = [Compressed(DynamicCache()) for _ in presses]
    for press in presses:
        if press is not None:
            press.post_init_from_model(model)

    def hook(module, inputs, kwargs, output):
        keys, values = extract_keys_and_values(kwargs["past_key_values"], module.layer_idx)
        for press, result in zip(presses, results):
            if result.error is None:
                compress_layer(module, press, result, kwargs, keys, values, output)
        return output

    language_model = model.model
    hooks = []
    for layer in language_model.layers:
        layer.self_attn.rotary_emb = language_model.rotary_emb  # what a press's context manager sets
        hooks.append(layer.self_attn.register_forward_hook(hook, with_kwargs=True))
    try:
        start = clock(model.device)
        model.model(input_ids=torch.tensor([context_ids], device=model.device), past_key_values=DynamicCache())
        seconds = clock(model.device) - start
    finally:
        for handle in hooks:
            handle.remove()
    return results, seconds


def compress_layer(module, press, result: Compressed, kwargs: dict, keys, values, output) -> None:
    """One press on one layer, into its own cache; a failure is kept, not raised."""
    start = clock(keys.device)
    try:
        if press is not None:
            keys, values = press.compress(module, kwargs["hidden_states"], keys, values, output[1], kwargs)
        result.cache.update(keys, values, module.layer_idx)
        result.masks[module.layer_idx] = getattr(module, "masked_key_indices", None)
    except Exception as error:  # one press failing must not end the others
        result.error = one_line(error)
        result.trace = trace_tail()
    module.masked_key_indices = None
    result.compress_s += clock(keys.device) - start


def prefill_with_own_hook(model, press, context_ids: list[int]) -> tuple[list[Compressed], float]:
    """kvpress's own way, one prefill for one press (to check the shared prefill against)."""
    start = clock(model.device)
    try:
        cache = prefill(model, press, context_ids)
    except Exception as error:
        return [Compressed(None, error=one_line(error), trace=trace_tail())], 0.0
    masks = {i: getattr(layer.self_attn, "masked_key_indices", None) for i, layer in enumerate(model.model.layers)}
    return [Compressed(cache, masks)], clock(model.device) - start


def use_masks(model, masks: dict) -> None:
    """Give each attention module the AdaKV masked keys of the press about to decode."""
    for index, layer in enumerate(model.model.layers):
        layer.self_attn.masked_key_indices = masks.get(index)


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
    device = model.device
    positions = torch.arange(context_len, context_len + len(suffix_ids), device=device).unsqueeze(0)
    out = model(input_ids=torch.tensor([suffix_ids], device=device), past_key_values=cache, position_ids=positions,
                logits_to_keep=1)
    generated = [int(out.logits[0, -1].argmax())]
    next_position = context_len + len(suffix_ids)
    while len(generated) < max_new and generated[-1] not in stop_ids:
        out = model(input_ids=torch.tensor([[generated[-1]]], device=device), past_key_values=cache,
                    position_ids=torch.tensor([[next_position]], device=device))
        generated.append(int(out.logits[0, -1].argmax()))
        next_position += 1
    return generated


def suffix_nll(model, cache, context_len: int, suffix_ids: list[int]) -> list[float]:
    """Negative log-likelihood of each suffix token after the first, given the compressed cache.

    The first suffix token is predicted by the prefill's last position, which runs without the
    lm head here, so it is left out.
    """
    device = model.device
    positions = torch.arange(context_len, context_len + len(suffix_ids), device=device).unsqueeze(0)
    out = model(input_ids=torch.tensor([suffix_ids], device=device), past_key_values=cache, position_ids=positions)
    log_probs = torch.log_softmax(out.logits[0, :-1].float(), dim=-1)
    targets = torch.tensor(suffix_ids[1:], device=device)
    return (-log_probs.gather(1, targets.unsqueeze(1)).squeeze(1)).tolist()


def stop_token_ids(model) -> set[int]:
    """The model's end-of-sequence ids."""
    eos = model.generation_config.eos_token_id
    return set(eos if isinstance(eos, list) else [eos] if eos is not None else [])


def base_row(instance: dict, run: dict) -> dict:
    return {
        "key": instance_key(instance),
        "task": instance["task"],
        "press": run["press"],
        "keep_ratio": run["keep_ratio"],
        "compression_ratio": run["compression_ratio"],
        "context_tokens": len(instance["context_ids"]),
    }


def error_row(row: dict, error: str, trace: list) -> dict:
    return {**row, "status": "error", "error": error, "traceback_tail": trace}


def trace_tail() -> list[str]:
    """The last lines of the traceback being handled."""
    return traceback.format_exc().strip().splitlines()[-3:]


def one_line(error: Exception) -> str:
    """``Type: first line of the message``."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}"


def build_press(run: dict, factories: dict):
    if run["press"] not in factories:
        raise KeyError(f"unknown press {run['press']!r}")
    return factories[run["press"]](run["compression_ratio"])


def run_instance(model, tokenizer, instance: dict, runs: list[dict], factories: dict, separate: bool) -> list[dict]:
    """Every run on one instance: shared prefills (one per attention implementation), then a
    decode per press. ``separate``: one prefill per press, each with its own hook."""
    rows = {}
    groups: dict = {}
    for index, run in enumerate(runs):
        try:
            press = build_press(run, factories)
        except Exception as error:
            rows[index] = error_row(base_row(instance, run), one_line(error), trace_tail())
            continue
        mode = "eager" if run["press"] in NEEDS_EAGER else "sdpa"
        groups.setdefault((mode, index) if separate else mode, []).append((index, press))
    for key, members in groups.items():
        set_attention(model, key[0] if separate else key)
        with torch.no_grad():
            if separate:
                compressed, prefill_s = prefill_with_own_hook(model, members[0][1], instance["context_ids"])
            else:
                compressed, prefill_s = compress_in_one_prefill(model, [press for _, press in members], instance["context_ids"])
        set_attention(model, "sdpa")
        for (index, _), result in zip(members, compressed):
            rows[index] = finish_run(model, tokenizer, instance, runs[index], result, prefill_s, len(members))
    return [rows[index] for index in range(len(runs))]


def finish_run(model, tokenizer, instance, run, result: Compressed, prefill_s: float, shared_by: int) -> dict:
    """Decode (or score) one press's compressed cache into its row."""
    row = base_row(instance, run)
    if result.error is not None:
        return error_row(row, result.error, result.trace)
    try:
        use_masks(model, result.masks)
        stored, effective = kept_tokens(model, result.cache)
        start = clock(model.device)
        with torch.no_grad():
            row.update(decode_or_score(model, tokenizer, result.cache, instance))
        row["decode_s"] = round(clock(model.device) - start, 3)
    except Exception as error:
        return error_row(row, one_line(error), trace_tail())
    finally:
        use_masks(model, {})
    row.update(prefill_s=round(prefill_s, 3), prefill_shared_by=shared_by, compress_s=round(result.compress_s, 3),
               kv_tokens_kept=stored, kv_tokens_effective=effective, status="ok")
    return row


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


def pair_key(instance: dict, run: dict) -> str:
    """``instance|press|keep ratio``, as the parent names rows it already has."""
    return f"{instance_key(instance)}|{run['press']}|{round(run['keep_ratio'], 9)}"


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
    model, tokenizer = load_model(Path(job["gguf"]), job.get("tokenizer"), job.get("device"), job.get("dtype"))
    factories = press_factories()
    stamp = {**versions(), "load_s": round(time.perf_counter() - started, 1),
             "device": str(model.device), "dtype": str(model.dtype).removeprefix("torch.")}
    print(json.dumps({"event": "loaded", **stamp}), flush=True)
    with open(job["out"], "a") as out:
        done = set(job.get("done", []))
        for instance in instances:
            runs = [run for run in job["runs"] if pair_key(instance, run) not in done]
            for row in run_instance(model, tokenizer, instance, runs, factories, bool(job.get("separate"))):
                row["versions"] = stamp
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
