"""Scores and cost figures the benchmark reports."""

from __future__ import annotations

import threading
import time

import psutil
import torch

DECODE_CHUNK = 16  # ppl/fidelity feed tokens 16 at a time (8-row GEMMs are slow here); the policy acts after each chunk
KL_POSITIONS = 32
COST_DECODE_TOKENS = 32


def kv_figures(cache, rows: int = 1) -> dict:
    """One prompt's KV figures, from a cache holding ``rows`` prompts: bytes held in this run and in a
    bf16 run, what a full cache holds in each, bytes in a second tier, tokens kept."""
    figures = {
        "kv_bytes": cache.kv_bytes, "kv_bytes_full": cache.kv_bytes_full,
        "kv_bytes_bf16": cache.kv_bytes_bf16, "kv_bytes_full_bf16": cache.kv_bytes_full_bf16,
        "tier_bytes": cache.tier_bytes,
    }
    return {name: value / rows for name, value in figures.items()} | {"kv_tokens": cache.kv_tokens()}


def kv_summary(entries: list[dict]) -> dict:
    """Mean KV figures over a cell's samples, with the fractions of the full cache (fp32 run, bf16)."""
    if not entries:
        return {}
    mean = {name: sum(e[name] for e in entries) / len(entries) for name in entries[0]}
    mean["kv_fraction"] = mean["kv_bytes"] / mean["kv_bytes_full"] if mean["kv_bytes_full"] else None
    mean["kv_fraction_bf16"] = mean["kv_bytes_bf16"] / mean["kv_bytes_full_bf16"] if mean["kv_bytes_full_bf16"] else None
    return mean


def matching_prefix(logits: torch.Tensor, reference: list[int]) -> float:
    """Fraction of the reference continuation reproduced before the first greedy divergence."""
    predicted = logits.argmax(-1).tolist()
    for index, (got, want) in enumerate(zip(predicted, reference)):
        if got != want:
            return index / len(reference)
    return 1.0


def mean_kl(reference_logits: torch.Tensor, logits: torch.Tensor) -> float:
    """Mean KL(reference || policy) of next-token distributions, in nats."""
    reference = torch.log_softmax(reference_logits.float(), -1)
    ours = torch.log_softmax(logits.float(), -1)
    return float((reference.exp() * (reference - ours)).sum(-1).mean())


class PeakRSS:
    """Samples the process RSS in a thread; ``peak`` is the maximum seen (bytes)."""

    def __init__(self, interval: float = 0.005):
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._process = psutil.Process()

    def __enter__(self):
        self.peak = self._process.memory_info().rss
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._process.memory_info().rss)
            time.sleep(self.interval)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


@torch.inference_mode()
def measure_cost(model, tokenizer, context_ids: list[int], policy) -> dict:
    """Real prefill under ``policy`` (timed), then ``COST_DECODE_TOKENS`` greedy decode steps."""
    import gc

    from tokensift.bench.decode import GreedyDecoder
    from tokensift.devices import clock, model_device
    from tokensift.engine import make_cache

    device = model_device(model)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    baseline = psutil.Process().memory_info().rss
    with PeakRSS() as memory:
        cache = make_cache(model, policy)
        decoder = GreedyDecoder(model, cache)
        start = clock(device)
        logits = decoder.feed([context_ids])
        prefill = clock(device) - start
        start = clock(device)
        decoder.run(logits, COST_DECODE_TOKENS + 1)  # COST_DECODE_TOKENS tokens fed
        decode = clock(device) - start
    return {
        "prefill_seconds": prefill, "decode_seconds": decode,
        "tokens_per_second": COST_DECODE_TOKENS / decode, **kv_figures(cache),
        "peak_rss_bytes": memory.peak, "peak_rss_increase_bytes": memory.peak - baseline,
        "threads": torch.get_num_threads(), **device_memory(device),
    }


def device_memory(device: torch.device) -> dict:
    """Peak memory allocated on an accelerator since the last reset (nothing on the CPU: RSS covers it)."""
    if device.type != "cuda":
        return {}
    return {"peak_device_bytes": torch.cuda.max_memory_allocated(device)}
