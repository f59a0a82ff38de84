"""Small caches against ``full``: decode speed and memory after one shared prefill.

``tokensift bench --suite small-cache --out DIR [--model NAME] [--lengths 8000] [--policies ...]``
writes ``results.jsonl`` and ``report.md``. For each length, one full prefill of an essay-stream
prompt is recorded and every policy's cache is rebuilt from it (:func:`~tokensift.bench.replay.replay`);
then every policy decodes ``steps`` greedy tokens, one step of each policy in turn (load drift on
this shared machine hits them alike). Reported per policy: the median decode step and its ratio
to ``full``'s, bytes held against a bf16 (and this run's fp32) full cache, bytes in a second tier,
and exact rows read from it per step.
"""

from __future__ import annotations

import statistics
from pathlib import Path

import torch

from tokensift.bench import metrics
from tokensift.bench.results import read_rows, write_rows
from tokensift.bench.suite import Suite
from tokensift.bench.table import fmt, markdown_table
from tokensift.bench.timing import load_1min
from tokensift.devices import clock, model_device, run_fields
from tokensift.errors import TokensiftError
from tokensift.policies import build_policy
from tokensift.selection import read_stats

DEFAULT_POLICIES = ("full", "tiered", "zipcache(hi_bits=4,lo_bits=4)", "zipcache")
DEFAULT_LENGTHS = (8000,)
READ_FRACTION = 16  # a reader without k= reads length / 16 tokens per head


def policy_for(expression: str, length: int):
    """The policy of ``expression``; readers without a ``k`` read ``length / READ_FRACTION`` tokens."""
    try:
        return build_policy(expression)
    except TokensiftError as error:  # a reader needs k: give it the default fraction
        if "needs k=" not in str(error):
            raise
        return build_policy(expression, k=length // READ_FRACTION)


def prompt(tokenizer, length: int, device=None) -> torch.Tensor:
    from tokensift.data import essay_stream

    ids = essay_stream(tokenizer).ids[:length]
    return torch.tensor([ids], dtype=torch.long, device=device)


@torch.inference_mode()
def decode_round_robin(model, caches: dict, first: torch.Tensor, length: int, steps: int) -> dict[str, list[float]]:
    """``steps`` greedy steps of every cache, one step of each in turn; seconds per step.

    Each cache decodes through the bench's one loop (:class:`~tokensift.bench.decode.GreedyDecoder`),
    one step at a time, so that load drift hits every policy alike."""
    from tokensift.bench.decode import GreedyDecoder

    decoders = {name: GreedyDecoder(model, cache, seen=length) for name, cache in caches.items()}
    tokens = {name: first for name in caches}
    times: dict[str, list[float]] = {name: [] for name in caches}
    for _ in range(steps):
        for name, decoder in decoders.items():
            logits = decoder.timed_feed_next(tokens[name], times[name].append)
            tokens[name] = logits.argmax(-1)
    return times


def length_rows(model, tokenizer, length: int, expressions: list[str], steps: int, label: str = "smollm2") -> list[dict]:
    from tokensift.bench.replay import record_prefill, replay

    device = model_device(model)
    start = clock(device)
    recording = record_prefill(model, prompt(tokenizer, length, device))
    prefill = clock(device) - start
    policies = {expression: policy_for(expression, length) for expression in expressions}
    caches = {name: replay(model, policy, recording) for name, policy in policies.items()}
    memory = {name: metrics.kv_figures(cache) for name, cache in caches.items()}  # after compression, before decoding
    load = load_1min(digits=None)
    times = decode_round_robin(model, caches, recording.logits.argmax(-1), length, steps)
    full_step = statistics.median(times["full"][1:]) if "full" in times else None
    rows = []
    for name, policy in policies.items():
        step = statistics.median(times[name][1:])  # the first step pays one-off allocations
        stats = read_stats(caches[name])
        fetched = stats.get("fetched_rows", 0) / max(stats.get("sparse", 0), 1) if stats.get("sparse") else None
        rows.append({
            "length": length, "policy": name, "label": policy.describe(), "params": policy.params(), "model": label,
            "step_seconds": step, "tokens_per_second": 1 / step, "speed_vs_full": full_step / step if full_step else None,
            "fetched_rows_per_layer_step": fetched, "prefill_seconds_full": prefill, "load": load,
            "threads": torch.get_num_threads(), **run_fields(model), **memory[name],
            "kv_fraction_bf16": memory[name]["kv_bytes_bf16"] / memory[name]["kv_bytes_full_bf16"],
            "kv_fraction": memory[name]["kv_bytes"] / memory[name]["kv_bytes_full"],
        })
    return rows


def write_report(rows: list[dict], out: Path, model: str) -> None:
    """report.md: one table of every policy at every length."""
    body = [[r["length"], r["label"], fmt(1 / r["kv_fraction_bf16"], 1), fmt(r["kv_fraction_bf16"], 3), fmt(r["kv_fraction"], 3),
             fmt(r["tier_bytes"] / 2**20, 1) if r["tier_bytes"] else "–", fmt(r["tokens_per_second"], 2),
             fmt(r["speed_vs_full"]), fmt(r["fetched_rows_per_layer_step"], 0)] for r in rows]
    header = ["length", "policy", "x smaller than bf16 full", "bytes / bf16 full", "bytes / fp32 full", "second tier MiB",
              "decode tok/s", "speed / full", "tier rows read per layer-step (all query heads)"]
    text = (f"# Small caches: memory and decode speed ({model})\n\n"
            f"One full prefill per length, every cache rebuilt from it; decode steps round-robin; median step; "
            f"threads {rows[0]['threads'] if rows else '?'}, load average {fmt(rows[0]['load'] if rows else None)}.\n\n"
            + markdown_table(header, body) + "\n")
    (out / "report.md").write_text(text)


def run_small_cache(out: Path, *, model: str | None = None, lengths: list[int] | None = None,
                    policies: list[str] | None = None, steps: int = 24, device: str | None = None,
                    dtype: str | None = None) -> None:
    """Run the suite and write ``results.jsonl`` and ``report.md`` into ``out``."""
    from tokensift.kernels import packed_linears
    from tokensift.models import load_model

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    expressions = list(policies or DEFAULT_POLICIES)
    if "full" not in expressions:
        expressions.insert(0, "full")
    for expression in expressions:  # bad input fails before the model loads
        policy_for(expression, 8192)
    loaded, tokenizer = load_model(model, device=device, dtype=dtype)
    rows = []
    with packed_linears(loaded):
        for length in lengths or DEFAULT_LENGTHS:
            rows += length_rows(loaded, tokenizer, length, expressions, steps, model or "smollm2")
    write_rows(out / "results.jsonl", rows)
    report(out)


def report(out: Path) -> None:
    """report.md from ``out/results.jsonl`` (rows written before they named the model: smollm2)."""
    rows = read_rows(Path(out) / "results.jsonl")
    write_report(rows, Path(out), rows[0].get("model", "smollm2") if rows else "smollm2")


SUITE = Suite(names=("small-cache",), options=("model", "lengths", "policies"), runner=f"{__name__}:run_small_cache",
              reporter=f"{__name__}:report")
