"""How each kind of task runs: ``retrieval`` (greedy answers after the context), ``ppl``
(perplexity), ``fidelity`` (agreement with the full cache) and ``cost`` (timed prefill and decode).

Each task in the registry (:mod:`tokensift.bench.tasks`) names its kind (``Task.runs``), and
:data:`RUNS` maps a kind to its runner. A runner takes a :class:`RunContext`, the job and the
settings to score, and appends one row per setting to ``context.results``.

Retrieval: each task instance's prompt (or a batch of ``PROMPT_BATCH`` of them) is prefilled once
with the full cache (queries recorded) and every policy's compressed cache is rebuilt from that
recording (:mod:`tokensift.bench.replay`). The question is then appended and the answer decoded
greedily — for policies that only evict, all their caches are stacked into one batch (no further
eviction after the question arrives, the kvpress protocol); policies that act at decode time
(sparse reading, custom storage) run alone. ``ppl`` and ``fidelity`` keep every policy active
during the scored tokens (decode-time budget).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from tokensift.bench import metrics
from tokensift.bench.config import BenchConfig, Setting, cell_key
from tokensift.bench.decode import greedy_tokens
from tokensift.bench.jobs import Job, cost_settings
from tokensift.bench.replay import merge_caches, record_prefill, replay
from tokensift.bench.results import Results, full_score, make_row
from tokensift.bench.tasks import QUERY_AGNOSTIC, build_instances, get_task
from tokensift.cache import SelectingLayer
from tokensift.devices import clock, model_device
from tokensift.policies import build_policy

MERGE_ROWS = 16  # settings per merged decode batch
MERGE_TOKENS = 16 * 1024  # cached tokens (rows x kept) per merged batch, at most about
PROMPT_BATCH = 1  # prompts of a retrieval task prefilled and decoded together (same context length)


@dataclass
class RunContext:
    """What every task runner needs: the model, where rows go, and how to report progress.

    Parameters
    ----------
    model, tokenizer
        The model under test and its tokenizer.
    config
        The run's :class:`~tokensift.bench.config.BenchConfig`.
    results
        The result store rows are appended to (and pending cells read from).
    progress
        Called with a number of finished units (prompts x settings).
    """

    model: object
    tokenizer: object
    config: BenchConfig
    results: Results
    progress: Callable[[int], None]


# ---------------------------------------------------------------------- retrieval
def is_mergeable(policy) -> bool:
    """Policies that only evict after prefill (stock layers, no decode-time reading) can share a batch."""
    return policy.layer_class in (None, SelectingLayer) and not policy.reads_subset


def answer_scores(model, tokenizer, cache, rows: list) -> list[float]:
    """Decode the answer of each row of ``cache`` (row ``r`` holds instance ``rows[r]``'s prompt) and score it."""
    spec = get_task(rows[0].task)

    def text(tokens: list[int], instance) -> str:
        return tokenizer.decode(tokens[: instance.max_new_tokens], skip_special_tokens=True)

    def settled(row: int, tokens: list[int]) -> bool:
        instance = rows[row]
        return len(tokens) >= instance.max_new_tokens or spec.settled(instance, text(tokens, instance))

    longest = max(instance.max_new_tokens for instance in rows)
    generated = greedy_tokens(model, cache, [instance.suffix_ids for instance in rows], longest, settled)
    return [spec.score(instance, text(tokens, instance)) for instance, tokens in zip(rows, generated)]


def merge_groups(settings: list[Setting], rows_per_setting: int = 1, length: int = 0) -> list[list[Setting]]:
    """Batches of settings to decode together, one size per batch (rows pad to the longest).

    At most ``MERGE_ROWS`` settings, and at most about ``MERGE_TOKENS`` cached tokens in all
    (``rows_per_setting`` prompts each), which bounds the merged cache's memory.
    """
    by_size: dict = {}
    for setting in settings:
        by_size.setdefault((setting.budget, setting.ratio), []).append(setting)
    groups = []
    for (budget, ratio), group in by_size.items():
        kept = budget or (math.ceil(ratio * length) if ratio else length)
        per_batch = max(1, min(MERGE_ROWS, MERGE_TOKENS // max(rows_per_setting * kept, 1)))
        groups += [group[i:i + per_batch] for i in range(0, len(group), per_batch)]
    return groups


def kv_entries(cache, rows: int) -> list[dict]:
    """The per-prompt KV figures of a cache holding ``rows`` prompts (their mean, once per prompt)."""
    return [metrics.kv_figures(cache, rows)] * rows


def run_retrieval(context: RunContext, job: Job, settings: list[Setting], recordings: dict | None = None) -> None:
    """Score every pending setting; ``PROMPT_BATCH`` prompts share one prefill and every decode.

    ``recordings`` (optional dict): prefills kept from an earlier call on the same prompts, and
    filled by this one (the gated long suite prefills each prompt once for the full cache and
    every policy)."""
    model, tokenizer, config, results = context.model, context.tokenizer, context.config, context.results
    task, protocol, length = job.task, job.protocol, job.length
    pending = results.pending(task, protocol, length, settings)
    if not pending:
        return
    instances = build_instances(task, tokenizer, length, config.samples_at(length), config.seed, protocol)
    scores = {s: [] for s in pending}
    kv = {s: [] for s in pending}
    started = clock(model_device(model))
    for first in range(0, len(instances), PROMPT_BATCH):
        batch = instances[first:first + PROMPT_BATCH]
        recording = None if recordings is None else recordings.get(first)
        if recording is None:
            recording = record_prefill(model, token_ids(model, [instance.context_ids for instance in batch]))
            if recordings is not None:
                recordings[first] = recording
        policies = {s: s.build() for s in pending}
        merged = [s for s in pending if is_mergeable(policies[s])]
        for group in merge_groups(merged, len(batch), recording.length):
            caches = [replay(model, policies[s], recording) for s in group]
            for s, cache in zip(group, caches):
                kv[s] += kv_entries(cache, len(batch))
            answers = answer_scores(model, tokenizer, merge_caches(caches, model), batch * len(group))
            for index, s in enumerate(group):
                scores[s] += answers[index * len(batch):(index + 1) * len(batch)]
            context.progress(len(group) * len(batch))
        for s in [s for s in pending if s not in merged]:
            cache = replay(model, policies[s], recording)
            cache.set_defer_eviction(True)  # same protocol as the merged rows
            kv[s] += kv_entries(cache, len(batch))
            scores[s] += answer_scores(model, tokenizer, cache, batch)
            context.progress(len(batch))
        del recording
    elapsed = clock(model_device(model)) - started
    for s in pending:
        extra = metrics.kv_summary(kv[s]) | {"wall_seconds_group": elapsed}
        results.write(make_row(task, protocol, length, s, config, scores[s], extra))


def run_gated(context: RunContext, job: Job, chosen: list[Setting]) -> None:
    """The full cache first; the other settings only where it scores at least ``config.full_gate``."""
    config = context.config
    full = [s for s in chosen if s.policy == "full" and s.budget is None and s.ratio is None]
    recordings: dict = {}  # each prompt prefilled once for both calls
    run_retrieval(context, job, full, recordings)
    score = full_score(context.results.path, cell_key(job.task, job.protocol, job.length, Setting("full")))
    if score is not None and score < config.full_gate:
        context.progress(sum(config.samples_at(job.length) for s in chosen if s not in full))
        return
    run_retrieval(context, job, chosen, recordings)


def run_retrieval_job(context: RunContext, job: Job, chosen: list[Setting]) -> None:
    """A retrieval job: gated (``config.full_gate``) unless it runs the full cache only."""
    if context.config.full_gate is not None and not job.full_only:
        run_gated(context, job, chosen)
    else:
        run_retrieval(context, job, chosen)


# ------------------------------------------------------------------ language model
def token_ids(model, ids: list) -> torch.Tensor:
    """Token ids (a list, or a list of equal-length lists) as a long tensor on the model's device."""
    return torch.tensor(ids, dtype=torch.long, device=model_device(model))


def decode_chunk(policy) -> int:
    """Tokens fed per forward when teacher forcing: reading policies read a subset only on
    single-token steps (blocks are dense), so they get one token at a time."""
    return 1 if policy.reads_subset else metrics.DECODE_CHUNK


@torch.inference_mode()
def teacher_forced_logits(model, cache, tokens: list[int], chunk: int) -> torch.Tensor:
    """Feed ``tokens`` in chunks of ``chunk`` (policy active after each); logits ``[n, vocab]``."""
    seen = cache.get_seq_length()
    mask = torch.ones(1, seen, dtype=torch.long, device=model_device(model))
    outputs = []
    for start in range(0, len(tokens), chunk):
        ids = token_ids(model, [tokens[start:start + chunk]])
        mask = torch.cat([mask, torch.ones_like(ids)], 1)
        out = model(input_ids=ids, attention_mask=mask, past_key_values=cache, use_cache=True)
        outputs.append(out.logits[0].float())
    return torch.cat(outputs)


def pending_work(context: RunContext, task: str, length: int, settings: list[Setting], samples: int) -> tuple[list, list]:
    """The settings of a query-agnostic ``task`` cell still to run, and its instances (none built
    when nothing is pending)."""
    pending = context.results.pending(task, QUERY_AGNOSTIC, length, settings)
    if not pending:
        return [], []
    return pending, build_instances(task, context.tokenizer, length, samples, context.config.seed)


def run_ppl(context: RunContext, job: Job, settings: list[Setting]) -> None:
    """Perplexity per setting; each setting's row is written as soon as it is done (resumable)."""
    model, config, results, length = context.model, context.config, context.results, job.length
    pending, instances = pending_work(context, "ppl", length, settings, config.ppl_samples)
    if not pending:
        return
    recordings = [record_prefill(model, token_ids(model, [instance.context_ids])) for instance in instances]
    for s in pending:
        nll, kv = [], []
        for instance, recording in zip(instances, recordings):
            policy = s.build()
            cache = replay(model, policy, recording)
            logits = teacher_forced_logits(model, cache, instance.suffix_ids[:-1], decode_chunk(policy))
            logits = torch.cat([recording.logits, logits])
            nll.append(float(torch.nn.functional.cross_entropy(logits, token_ids(model, instance.suffix_ids))))
            kv.append(metrics.kv_figures(cache))
            context.progress(1)
        mean_nll = sum(nll) / len(nll)
        extra = metrics.kv_summary(kv) | {"nll": mean_nll, "ppl": math.exp(mean_nll), "scored_tokens": len(instances[0].suffix_ids)}
        results.write(make_row("ppl", QUERY_AGNOSTIC, length, s, config, [math.exp(x) for x in nll], extra))


def run_fidelity(context: RunContext, job: Job, settings: list[Setting]) -> None:
    """Greedy agreement with (and KL from) the full cache over a continuation, per setting."""
    model, config, results, length = context.model, context.config, context.results, job.length
    pending, instances = pending_work(context, "fidelity", length, settings, config.fidelity_samples)
    if not pending:
        return
    match = {s: [] for s in pending}
    kl = {s: [] for s in pending}
    for instance in instances:
        recording = record_prefill(model, token_ids(model, [instance.context_ids]))
        full_cache = replay(model, build_policy("full"), recording)
        reference_tokens = greedy_tokens(model, full_cache, [instance.suffix_ids], instance.max_new_tokens)[0]
        fed = instance.suffix_ids + reference_tokens[:-1]
        reference = teacher_forced_logits(model, replay(model, build_policy("full"), recording), fed, metrics.DECODE_CHUNK)
        reference = reference[len(instance.suffix_ids) - 1:]
        for s in pending:
            policy = s.build()
            logits = teacher_forced_logits(model, replay(model, policy, recording), fed, decode_chunk(policy))
            logits = logits[len(instance.suffix_ids) - 1:]
            match[s].append(metrics.matching_prefix(logits, reference_tokens))
            kl[s].append(metrics.mean_kl(reference[: metrics.KL_POSITIONS], logits[: metrics.KL_POSITIONS]))
            context.progress(1)
    for s in pending:
        extra = {"kl": sum(kl[s]) / len(kl[s]), "sample_kl": kl[s]}
        results.write(make_row("fidelity", QUERY_AGNOSTIC, length, s, config, match[s], extra))


# ------------------------------------------------------------------------- cost
def run_cost(context: RunContext, job: Job, settings: list[Setting]) -> None:
    """Timed prefill and decode (and memory) of each of ``settings`` at ``job.length``."""
    config, results, length = context.config, context.results, job.length
    pending = results.pending("cost", QUERY_AGNOSTIC, length, cost_settings(config, settings))
    if not pending:
        return
    instance = build_instances("fidelity", context.tokenizer, length, 1, config.seed)[0]
    for s in pending:
        figures = metrics.measure_cost(context.model, context.tokenizer, instance.context_ids, s.build())
        results.write(make_row("cost", QUERY_AGNOSTIC, length, s, config, [figures["tokens_per_second"]], figures))
        context.progress(1)


RUNS: dict[str, Callable[[RunContext, Job, list[Setting]], None]] = {
    "retrieval": run_retrieval_job, "ppl": run_ppl, "fidelity": run_fidelity, "cost": run_cost,
}
