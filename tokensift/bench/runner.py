"""``tokensift bench``: the quality/cost matrix on shipped real data, resumable.

Cells are (task, protocol, length, policy, budget). Each task instance's prompt (or a batch of
``PROMPT_BATCH`` of them) is prefilled once with the full cache (queries recorded) and every policy's compressed cache is
rebuilt from that recording (:mod:`tokensift.bench.replay`). Retrieval tasks then append the
question and decode the answer greedily — for policies that only evict, all their caches are
stacked into one batch (no further eviction after the question arrives, the kvpress
protocol); policies that act at decode time (sparse reading, custom storage) run alone.
``ppl`` and ``fidelity`` keep every policy active during the scored tokens (decode-time budget).
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import platform
import queue
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from tokensift.bench import metrics
from tokensift.bench.replay import merge_caches, record_prefill, replay
from tokensift.bench.tasks import QUERY_AGNOSTIC, RETRIEVAL_TASKS, RULER_TASKS, build_instances, get_task
from tokensift.cache import SelectingLayer
from tokensift.devices import clock, model_device, resolve_device, resolve_dtype, run_fields
from tokensift.errors import TokensiftError
from tokensift.generate import Decoder, left_pad
from tokensift.kernels import packed_linears
from tokensift.policies import POLICIES, build_policy

# wrapped combinations the bench adds to the registry: only inners other than the wrapper's default
# (graphkv, pyramidkv and adakv already wrap snapkv; caote wraps h2o)
WRAPPED_DEFAULTS = ("caote(snapkv)",)
MERGE_ROWS = 16  # settings per merged decode batch
MERGE_TOKENS = 16 * 1024  # cached tokens (rows x kept) per merged batch, at most about
PROMPT_BATCH = 1  # prompts of a retrieval task prefilled and decoded together (same context length)
ALL_TOKENS = "@all"  # policy suffix: one setting with no budget
KERNELS = ("packed", "stock")


@dataclass
class BenchConfig:
    """What to run. ``for_suite`` fills the suite's defaults; explicit values win."""

    suite: str = "quick"
    policies: list[str] = field(default_factory=list)
    budgets: list[int] = field(default_factory=list)
    ratios: list[float] = field(default_factory=list)
    lengths: list[int] = field(default_factory=list)
    tasks: list[str] = field(default_factory=list)
    protocols: list[str] = field(default_factory=lambda: [QUERY_AGNOSTIC])
    samples: int = 2
    seed: int = 0
    ppl_length: int = 8192
    ppl_samples: int = 1
    fidelity_samples: int = 2
    cost_lengths: list[int] = field(default_factory=list)
    full_only_tasks: list[str] = field(default_factory=list)  # retrieval tasks run with the full cache only
    lm_budgets: list[int] = field(default_factory=list)  # ppl/fidelity budgets (default: ``budgets``)
    model: str | None = None
    kernels: str = "packed"  # linear layers on prepacked oneDNN weights ("stock": PyTorch's default path)
    device: str | None = None  # where the model runs (None: the CPU); see tokensift.devices
    dtype: str | None = None  # the model's weights (None: float32, the exact reference)
    length_samples: list[list[int]] = field(default_factory=list)  # [[length, samples], ...]: fewer prompts at some lengths
    full_gate: float | None = None  # run a task's policies only where the full cache scores at least this

    def samples_at(self, length: int) -> int:
        """Retrieval prompts per cell at ``length`` (``samples`` unless ``length_samples`` says otherwise)."""
        return dict((n, s) for n, s in self.length_samples).get(length, self.samples)

    @classmethod
    def for_suite(cls, suite: str, **overrides) -> BenchConfig:
        if suite not in SUITES:
            raise TokensiftError(f"unknown suite '{suite}'; use one of: {', '.join(SUITES)}")
        base = SUITES[suite]()
        if overrides.get("tasks") is not None and overrides.get("full_only_tasks") is None:
            base.full_only_tasks = []  # tasks named by hand run with every policy
        for key, value in overrides.items():
            if value is not None:
                setattr(base, key, value)
        if not base.policies:
            base.policies = default_policies()
        return base


def default_policies() -> list[str]:
    """Every registered policy that builds on its own, plus the usual wrapper combinations."""
    names = sorted(POLICIES)
    wrapped = [expr for expr in WRAPPED_DEFAULTS if expr.split("(")[0] in POLICIES]
    return ["full"] + [n for n in names if n != "full"] + wrapped


SUITES = {
    "quick": lambda: BenchConfig(
        suite="quick", budgets=[128], lengths=[1024], tasks=list(RULER_TASKS) + ["ppl", "fidelity", "cost"],
        samples=2, ppl_length=2048, fidelity_samples=1, cost_lengths=[1024],
        policies=["full", "streaming_llm", "snapkv", "h2o", "tova", "knorm", "a2sf", "random"],
    ),
    # the full matrix on the task the full cache solves at 4k (>= 0.5 over 20 prompts on the embedded
    # model: niah only); the others get their full-cache score only, which the report lists (name them
    # with --tasks to run them with every policy)
    "standard": lambda: BenchConfig(
        suite="standard", budgets=[64, 128, 256, 512, 1024], lengths=[4096],
        tasks=list(RULER_TASKS) + ["ppl", "fidelity", "cost"], samples=20, cost_lengths=[4096],
        full_only_tasks=["niah_multivalue", "niah_multikey", "niah_multiquery", "vt", "cwe"], lm_budgets=[128, 512],
    ),
    "full": lambda: BenchConfig(
        suite="full", budgets=[64, 128, 256, 512, 1024], lengths=[1024, 2048, 4096, 8192],
        tasks=list(RULER_TASKS) + ["ppl", "fidelity", "cost"], samples=20,
        protocols=[QUERY_AGNOSTIC, "query_aware"], cost_lengths=[1024, 2048, 4096, 8192],
    ),
    # long context on Gemma 3 270M (32k context; 15 of its 18 layers slide over 512 tokens, so
    # policies act on the 3 full-attention layers): each task's full cache first, then every policy
    # at 4 budgets where the full cache scores >= 0.3 (the others are reported, not run further)
    "long": lambda: BenchConfig(
        suite="long", model="gemma3", budgets=[256, 512, 1024, 2048], lengths=[8192, 16384, 32768],
        tasks=["niah", "niah_multikey", "niah_multivalue", "niah_multiquery", "vt", "essay_qa"],
        samples=8, length_samples=[[32768, 4]], full_gate=0.3,
    ),
}


# ---------------------------------------------------------------------------- cells
@dataclass(frozen=True)
class Setting:
    """One policy at one size."""

    policy: str
    budget: int | None = None
    ratio: float | None = None

    @property
    def label(self) -> str:
        if self.budget is not None:
            return f"{self.policy}@{self.budget}"
        return f"{self.policy}@r{self.ratio}" if self.ratio is not None else self.policy

    def build(self):
        return build_policy(self.policy, budget=self.budget, ratio=self.ratio)


def settings_for(config: BenchConfig, budgets: list[int] | None = None) -> list[Setting]:
    """Every (policy, size) pair; ``full`` once; policies that fail to build are reported and skipped.

    ``name@all`` runs a policy once without a budget (e.g. ``zipcache@all``: quantize, evict nothing).
    """
    out = []
    for policy in config.policies:
        if policy == "full" or policy.endswith(ALL_TOKENS):
            out.append(Setting(policy.removesuffix(ALL_TOKENS)))
            continue
        budgets = config.budgets if budgets is None else budgets
        sizes = [Setting(policy, budget=b) for b in budgets] + [Setting(policy, ratio=r) for r in config.ratios]
        for setting in sizes:
            try:
                setting.build()
            except TokensiftError as error:
                print(f"skipping {setting.label}: {error}")
                continue
            out.append(setting)
    return out


def cell_key(task: str, protocol: str, length: int, setting: Setting) -> str:
    return f"{task}|{protocol}|{length}|{setting.label}"


def read_rows(path: Path, repair: bool = False) -> list[dict]:
    """The rows of an append-only jsonl file, tolerant of a run killed mid-write.

    A line that is not a complete JSON row (torn by a kill: unterminated, or cut short) is
    dropped, and so is a row whose ``cell`` repeats an earlier one. ``repair`` then rewrites the
    file without them, atomically (a temporary file renamed over it); the good lines keep their
    exact bytes.
    """
    if not path.exists():
        return []
    data = path.read_bytes()
    rows, good, seen, dropped = [], [], set(), False
    for line in data.splitlines(keepends=True):
        try:
            row = json.loads(line) if line.endswith(b"\n") else None
        except ValueError:
            row = None
        if not isinstance(row, dict) or row.get("cell", id(row)) in seen:
            dropped = dropped or bool(line.strip())
            continue
        seen.add(row.get("cell", id(row)))
        rows.append(row)
        good.append(line)
    if repair and dropped:
        temporary = path.with_name(path.name + ".repair")
        temporary.write_bytes(b"".join(good))
        os.replace(temporary, path)
    return rows


class Results:
    """``results.jsonl``: one row per finished cell; rerunning skips what is there.

    Rows are appended with one ``write`` each and flushed to disk; a row torn by a kill is
    dropped (and the file repaired) when the next run reads the file (``repair``: only the
    process that owns the run, never a worker while others append).
    """

    def __init__(self, path: Path, repair: bool = True):
        self.path = path
        self.done = {row["cell"] for row in read_rows(path, repair=repair)}

    def pending(self, task: str, protocol: str, length: int, settings: list[Setting]) -> list[Setting]:
        return [s for s in settings if cell_key(task, protocol, length, s) not in self.done]

    def write(self, row: dict) -> None:
        """Append one row in a single write, so parallel workers never interleave lines."""
        line = (json.dumps(row) + "\n").encode()
        handle = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            if os.write(handle, line) != len(line):
                raise OSError(f"short write to {self.path}")
            os.fsync(handle)
        finally:
            os.close(handle)
        self.done.add(row["cell"])


def environment(config: BenchConfig) -> dict:
    import transformers

    import tokensift

    return {
        "versions": {"tokensift": tokensift.__version__, "torch": torch.__version__, "transformers": transformers.__version__},
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(), "python": platform.python_version()},
        "seed": config.seed,
        "suite": config.suite,
        "kernels": config.kernels,
        "model": model_name(config.model),
        "device": str(resolve_device(config.device)),
        "dtype": str(resolve_dtype(config.dtype)).removeprefix("torch."),
    }


def model_name(model: str | None) -> str:
    """The model as rows and reports name it (``smollm2`` when none was given)."""
    from tokensift.models import DEFAULT_MODEL

    return model or DEFAULT_MODEL


def make_row(task, protocol, length, setting: Setting, config, scores: list[float], extra: dict) -> dict:
    policy = setting.build()
    row = {
        "cell": cell_key(task, protocol, length, setting), "library": "tokensift", "task": task,
        "protocol": protocol, "length": length, "policy": setting.policy, "budget": setting.budget,
        "ratio": setting.ratio, "params": policy.params(), "samples": len(scores),
        "score": sum(scores) / len(scores) if scores else float("nan"), "sample_scores": scores,
    }
    row.update(extra)
    row.update(environment(config))
    return row


# ------------------------------------------------------------------------- running
def is_mergeable(policy) -> bool:
    """Policies that only evict after prefill (stock layers, no decode-time reading) can share a batch."""
    layer_class = getattr(policy, "layer_class", None)
    return (layer_class in (None, SelectingLayer)) and not getattr(policy, "reads_subset", False)


@torch.inference_mode()
def greedy_tokens(model, cache, suffixes: list[list[int]], max_new_tokens: int, settled=None) -> list[list[int]]:
    """Append ``suffixes[row]`` to each row of ``cache`` and decode greedily.

    Shorter suffixes are padded on their left (masked slots between the cached prompt and
    the suffix; positions stay contiguous). ``settled(row, tokens)`` (optional) says a row's
    score can no longer change; decoding stops when every row is settled, so the scores equal
    those of decoding all ``max_new_tokens``.
    """
    rows = len(suffixes)
    decoder = Decoder(model, cache)
    device = model_device(model)
    decoder.mask = torch.ones(rows, cache.get_seq_length(), dtype=torch.long, device=device)
    logits = decoder.forward(*left_pad(suffixes, pad_id=0, device=device))
    out: list[list[int]] = [[] for _ in range(rows)]
    for step in range(max_new_tokens):
        next_ids = logits.argmax(-1)
        for tokens, token in zip(out, next_ids.tolist()):
            tokens.append(token)
        if step + 1 == max_new_tokens or (settled is not None and all(settled(r, t) for r, t in enumerate(out))):
            break
        logits = decoder.forward(next_ids[:, None], torch.ones(rows, 1, dtype=torch.long, device=device))
    return out


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


def run_retrieval(model, tokenizer, config, results, task, protocol, length, settings, progress, recordings=None) -> None:
    """Score every pending setting; ``PROMPT_BATCH`` prompts share one prefill and every decode.

    ``recordings`` (optional dict): prefills kept from an earlier call on the same prompts, and
    filled by this one (the gated long suite prefills each prompt once for the full cache and
    every policy)."""
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
            progress(len(group) * len(batch))
        for s in [s for s in pending if s not in merged]:
            cache = replay(model, policies[s], recording)
            cache.set_defer_eviction(True)  # same protocol as the merged rows
            kv[s] += kv_entries(cache, len(batch))
            scores[s] += answer_scores(model, tokenizer, cache, batch)
            progress(len(batch))
        del recording
    elapsed = clock(model_device(model)) - started
    for s in pending:
        extra = metrics.kv_summary(kv[s]) | {"wall_seconds_group": elapsed}
        results.write(make_row(task, protocol, length, s, config, scores[s], extra))


def token_ids(model, ids: list) -> torch.Tensor:
    """Token ids (a list, or a list of equal-length lists) as a long tensor on the model's device."""
    return torch.tensor(ids, dtype=torch.long, device=model_device(model))


def decode_chunk(policy) -> int:
    """Tokens fed per forward when teacher forcing: reading policies read a subset only on
    single-token steps (blocks are dense), so they get one token at a time."""
    return 1 if getattr(policy, "reads_subset", False) else metrics.DECODE_CHUNK


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


def run_ppl(model, tokenizer, config, results, settings, progress) -> None:
    """Perplexity per setting; each setting's row is written as soon as it is done (resumable)."""
    length = config.ppl_length
    pending = results.pending("ppl", QUERY_AGNOSTIC, length, settings)
    if not pending:
        return
    instances = build_instances("ppl", tokenizer, length, config.ppl_samples, config.seed)
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
            progress(1)
        mean_nll = sum(nll) / len(nll)
        extra = metrics.kv_summary(kv) | {"nll": mean_nll, "ppl": math.exp(mean_nll), "scored_tokens": len(instances[0].suffix_ids)}
        results.write(make_row("ppl", QUERY_AGNOSTIC, length, s, config, [math.exp(x) for x in nll], extra))


def run_fidelity(model, tokenizer, config, results, length, settings, progress) -> None:
    pending = results.pending("fidelity", QUERY_AGNOSTIC, length, settings)
    if not pending:
        return
    instances = build_instances("fidelity", tokenizer, length, config.fidelity_samples, config.seed)
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
            progress(1)
    for s in pending:
        extra = {"kl": sum(kl[s]) / len(kl[s]), "sample_kl": kl[s]}
        results.write(make_row("fidelity", QUERY_AGNOSTIC, length, s, config, match[s], extra))


def run_cost(model, tokenizer, config, results, length, settings, progress) -> None:
    pending = results.pending("cost", QUERY_AGNOSTIC, length, cost_settings(config, settings))
    if not pending:
        return
    instance = build_instances("fidelity", tokenizer, length, 1, config.seed)[0]
    for s in pending:
        figures = metrics.measure_cost(model, tokenizer, instance.context_ids, s.build())
        results.write(make_row("cost", QUERY_AGNOSTIC, length, s, config, [figures["tokens_per_second"]], figures))
        progress(1)


# -------------------------------------------------------------------------- driving
@dataclass(frozen=True)
class Job:
    """One unit of scheduling: a task at one length and protocol (``full_only``: full cache only)."""

    task: str
    length: int
    protocol: str = QUERY_AGNOSTIC
    full_only: bool = False

    @property
    def label(self) -> str:
        protocol = f" {self.protocol}" if self.task in RETRIEVAL_TASKS else ""
        return f"{self.task}{protocol} {self.length}{' (full cache only)' if self.full_only else ''}"


def plan_jobs(config: BenchConfig) -> list[Job]:
    """Every job of the run except ``cost`` (which runs last, alone), the heaviest first (workers
    take them in order, so the small full-cache-only jobs fill the gaps at the end)."""
    named = config.tasks + [t for t in config.full_only_tasks if t not in config.tasks]
    retrieval = [t for t in named if t in RETRIEVAL_TASKS]
    jobs = [Job(t, n, p, t in config.full_only_tasks) for n in config.lengths for p in config.protocols for t in retrieval]
    every_policy = [job for job in jobs if not job.full_only]
    language = [Job("ppl", config.ppl_length)] if "ppl" in config.tasks else []
    language += [Job("fidelity", n) for n in config.lengths if "fidelity" in config.tasks]
    return every_policy + language + [job for job in jobs if job.full_only]


def job_settings(job: Job, config: BenchConfig, settings: list[Setting]) -> list[Setting]:
    if job.full_only:
        return [Setting("full")]
    if job.task in ("ppl", "fidelity") and config.lm_budgets:
        return settings_for(config, budgets=config.lm_budgets)
    return settings


def job_units(job: Job, config: BenchConfig, settings: list[Setting]) -> int:
    count = len(job_settings(job, config, settings))
    samples = {"ppl": config.ppl_samples, "fidelity": config.fidelity_samples}.get(job.task, config.samples_at(job.length))
    return count * samples


def run_job(job: Job, model, tokenizer, config: BenchConfig, results: Results, settings, progress) -> None:
    chosen = job_settings(job, config, settings)
    if job.task == "ppl":
        run_ppl(model, tokenizer, config, results, chosen, progress)
    elif job.task == "fidelity":
        run_fidelity(model, tokenizer, config, results, job.length, chosen, progress)
    elif config.full_gate is not None and not job.full_only:
        run_gated(model, tokenizer, config, results, job, chosen, progress)
    else:
        run_retrieval(model, tokenizer, config, results, job.task, job.protocol, job.length, chosen, progress)


def run_gated(model, tokenizer, config: BenchConfig, results: Results, job: Job, chosen, progress) -> None:
    """The full cache first; the other settings only where it scores at least ``config.full_gate``."""
    full = [s for s in chosen if s.policy == "full" and s.budget is None and s.ratio is None]
    recordings: dict = {}  # each prompt prefilled once for both calls
    run_retrieval(model, tokenizer, config, results, job.task, job.protocol, job.length, full, progress, recordings)
    score = full_score(results.path, cell_key(job.task, job.protocol, job.length, Setting("full")))
    if score is not None and score < config.full_gate:
        progress(sum(config.samples_at(job.length) for s in chosen if s not in full))
        return
    run_retrieval(model, tokenizer, config, results, job.task, job.protocol, job.length, chosen, progress, recordings)


def full_score(path: Path, cell: str) -> float | None:
    """The score of ``cell`` in a results file (None if it is not there)."""
    if not path.exists():
        return None
    for line in path.read_text().splitlines():
        if line.strip() and f'"{cell}"' in line:
            row = json.loads(line)
            if row.get("cell") == cell:
                return row.get("score")
    return None


def chosen_kernels(model, config: BenchConfig):
    """The linear kernels ``config`` asks for, for the ``with`` block that runs jobs on ``model``."""
    return packed_linears(model, config.kernels == "packed") if model is not None else nullcontext()


def worker_main(fields: dict, out: str, todo, reports, threads: int) -> None:
    """A worker process: load the model once, then run jobs from ``todo`` until ``None``."""
    from tokensift.models import load_model

    torch.set_num_threads(threads)
    try:
        config = BenchConfig(**fields)
        model, tokenizer = load_model(config.model, device=config.device, dtype=config.dtype)
        results, settings = Results(Path(out) / "results.jsonl", repair=False), settings_for(config)
        with chosen_kernels(model, config):
            for job in iter(todo.get, None):
                started = time.perf_counter()
                run_job(job, model, tokenizer, config, results, settings, lambda n: reports.put(("units", n)))
                reports.put(("job", f"{job.label} done in {time.perf_counter() - started:.0f} s"))
    except Exception as error:  # noqa: BLE001  (reported to the parent, which stops the run)
        reports.put(("error", f"{type(error).__name__}: {error}"))
        return
    reports.put(("done", None))


def run_in_workers(config: BenchConfig, out: Path, jobs: list[Job], workers: int, advance, note) -> None:
    """Run ``jobs`` in ``workers`` processes sharing the cores; each appends its own rows."""
    context = multiprocessing.get_context("spawn")
    todo, reports = context.Queue(), context.Queue()
    for job in jobs + [None] * workers:
        todo.put(job)
    threads = max(1, torch.get_num_threads() // workers)
    processes = [context.Process(target=worker_main, args=(asdict(config), str(out), todo, reports, threads)) for _ in range(workers)]
    for process in processes:
        process.start()
    try:
        finished = 0
        while finished < workers:
            try:
                kind, value = reports.get(timeout=5)
            except queue.Empty:
                if any(p.exitcode not in (None, 0) for p in processes):
                    raise TokensiftError("a bench worker died (out of memory?); rerun the command to resume") from None
                continue
            if kind == "error":
                raise TokensiftError(f"bench worker failed: {value}; rerun the command to resume")
            finished += kind == "done"
            if kind == "units":
                advance(value)
            elif kind == "job":
                note(value)
    finally:
        for process in processes:
            if process.is_alive():
                process.terminate()
            process.join()


def run_bench(config: BenchConfig, out: Path, model=None, tokenizer=None, workers: int = 1,
              ray: str | None = None) -> None:
    """Run (or resume) the matrix in ``out`` and write the report and plots.

    ``workers`` > 1 runs the jobs in that many processes (each loads ``config.model``), then
    ``cost`` alone in this process so its timings are not disturbed. ``ray`` (an address, or
    ``local``) runs the jobs on a Ray cluster instead (``workers`` > 1: that many Ray workers).
    """
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from tokensift.bench.report import write_report
    from tokensift.models import load_model

    if workers < 1:
        raise TokensiftError(f"--workers must be at least 1, got {workers}")
    if config.kernels not in KERNELS:
        raise TokensiftError(f"unknown kernels '{config.kernels}'; use one of: {', '.join(KERNELS)}")
    resolve_device(config.device), resolve_dtype(config.dtype)  # one-line errors before anything is written
    check_config(config)
    if ray is not None:
        from tokensift.ray_cluster import check_address, require_ray

        require_ray("tokensift bench --ray"), check_address(ray, "tokensift bench --ray")
    if model is not None:  # rows record where the given model really runs
        config = replace(config, **run_fields(model))
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(asdict(config), indent=1))
    results = Results(out / "results.jsonl")
    settings = settings_for(config)
    jobs = [job for job in plan_jobs(config) if pending_job(job, config, results, settings)]
    console = Console(stderr=True)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console) as bar:
        total = sum(job_units(job, config, settings) for job in jobs) + cost_units(config, settings)
        handle = bar.add_task("bench", total=total)
        advance = lambda n: bar.advance(handle, n)  # noqa: E731
        started = time.perf_counter()

        def note(text: str) -> None:  # a line per finished job where the bar cannot be drawn (logs)
            if not console.is_terminal:
                console.print(f"[{time.perf_counter() - started:7.0f} s] {text}", highlight=False)

        if ray is not None and jobs:
            from tokensift.bench.ray_runner import run_on_ray

            bar.update(handle, description=f"{len(jobs)} jobs on Ray")
            run_on_ray(config, out, jobs, ray, workers if workers > 1 else None, advance, note)
            results = Results(out / "results.jsonl")
            jobs = []
        elif workers > 1 and jobs:
            bar.update(handle, description=f"{len(jobs)} jobs in {workers} workers")
            run_in_workers(config, out, jobs, workers, advance, note)
            results = Results(out / "results.jsonl")
            jobs = []
        if model is None and (jobs or cost_units(config, settings)):
            model, tokenizer = load_model(config.model, device=config.device, dtype=config.dtype)
        with chosen_kernels(model, config):
            for job in jobs:
                bar.update(handle, description=job.label)
                run_job(job, model, tokenizer, config, results, settings, advance)
                note(f"{job.label} done")
            for length in config.cost_lengths if "cost" in config.tasks else []:
                bar.update(handle, description=f"cost {length}")
                run_cost(model, tokenizer, config, results, length, settings, advance)
                note(f"cost {length} done")
    write_report(out)
    console.print(f"results: {out / 'results.jsonl'}  report: {out / 'report.md'}")


def check_config(config: BenchConfig) -> None:
    """One-line errors for a matrix no run can do: unknown tasks, protocols or policies, sizes out of range."""
    from tokensift.bench.tasks.base import context_length
    from tokensift.bench.tasks.instance import check_protocol
    from tokensift.policies.registry import get_policy_class, parse_expression

    for name in config.tasks + config.full_only_tasks:
        if name != "cost":
            get_task(name)
    for protocol in config.protocols:
        check_protocol(protocol)
    for length in config.lengths + config.cost_lengths + ([config.ppl_length] if "ppl" in config.tasks else []):
        context_length(length)
    for count, what in ((config.samples, "--samples"), (config.ppl_samples, "ppl samples"), (config.fidelity_samples, "fidelity samples")):
        if count < 1:
            raise TokensiftError(f"{what} must be at least 1, got {count}")
    for budget in config.budgets + config.lm_budgets:
        if budget < 1:
            raise TokensiftError(f"a budget must be at least 1 token, got {budget}")
    for ratio in config.ratios:
        if not 0.0 < ratio < 1.0:
            raise TokensiftError(f"a ratio must be between 0 and 1 exclusive, got {ratio}")
    for expression in config.policies:
        node = parse_expression(expression.removesuffix(ALL_TOKENS))
        while node is not None:
            get_policy_class(node.name)
            node = node.inner


def pending_job(job: Job, config: BenchConfig, results: Results, settings: list[Setting]) -> bool:
    chosen = job_settings(job, config, settings)
    return bool(results.pending(job.task, job.protocol, job.length, chosen))


def cost_units(config: BenchConfig, settings: list[Setting]) -> int:
    if "cost" not in config.tasks:
        return 0
    return len(cost_settings(config, settings)) * len(config.cost_lengths)


def cost_settings(config: BenchConfig, settings: list[Setting]) -> list[Setting]:
    """The settings the cost task measures: ``full`` and every policy at the middle budget."""
    budget = config.budgets[len(config.budgets) // 2] if config.budgets else None
    return [s for s in settings if s.policy == "full" or s.budget == budget]
