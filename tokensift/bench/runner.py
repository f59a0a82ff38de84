"""``tokensift bench``: the quality/cost matrix on shipped real data, resumable.

Cells are (task, protocol, length, policy, budget). For each task instance the prompt is
prefilled once with the full cache (queries recorded) and every policy's compressed cache is
rebuilt from that recording (:mod:`tokensift.bench.replay`). Retrieval tasks then append the
question and decode the answer greedily — for policies that only evict, all their caches are
stacked into one batch (no further eviction after the question arrives, the kvpress
protocol); policies that act at decode time (sparse reading, custom storage) run alone.
``ppl`` and ``fidelity`` keep every policy active during the scored tokens (decode-time budget).
"""

from __future__ import annotations

import json
import math
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from tokensift.bench import metrics
from tokensift.bench.replay import merge_caches, record_prefill, replay
from tokensift.bench.tasks import QUERY_AGNOSTIC, RETRIEVAL_TASKS, build_instances, score
from tokensift.cache import SelectingLayer
from tokensift.errors import TokensiftError
from tokensift.generate import Decoder
from tokensift.policies import POLICIES, build_policy

# wrapped combinations the bench adds to the registry: only inners other than the wrapper's default
# (graphkv, pyramidkv and adakv already wrap snapkv; caote wraps h2o)
WRAPPED_DEFAULTS = ("caote(snapkv)",)
MERGE_ROWS = 16
ALL_TOKENS = "@all"  # policy suffix: one setting with no budget


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
    model: str | None = None

    @classmethod
    def for_suite(cls, suite: str, **overrides) -> BenchConfig:
        base = SUITES[suite]()
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
        suite="quick", budgets=[128], lengths=[1024], tasks=list(RETRIEVAL_TASKS) + ["ppl", "fidelity", "cost"],
        samples=2, ppl_length=2048, fidelity_samples=1, cost_lengths=[1024],
        policies=["full", "streaming_llm", "snapkv", "h2o", "tova", "knorm", "a2sf", "random"],
    ),
    "standard": lambda: BenchConfig(
        suite="standard", budgets=[64, 128, 256, 512, 1024], lengths=[4096],
        tasks=list(RETRIEVAL_TASKS) + ["ppl", "fidelity", "cost"], samples=20, cost_lengths=[4096],
    ),
    "full": lambda: BenchConfig(
        suite="full", budgets=[64, 128, 256, 512, 1024], lengths=[1024, 2048, 4096, 8192],
        tasks=list(RETRIEVAL_TASKS) + ["ppl", "fidelity", "cost"], samples=20,
        protocols=[QUERY_AGNOSTIC, "query_aware"], cost_lengths=[1024, 2048, 4096, 8192],
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


def settings_for(config: BenchConfig) -> list[Setting]:
    """Every (policy, size) pair; ``full`` once; policies that fail to build are reported and skipped.

    ``name@all`` runs a policy once without a budget (e.g. ``zipcache@all``: quantize, evict nothing).
    """
    out = []
    for policy in config.policies:
        if policy == "full" or policy.endswith(ALL_TOKENS):
            out.append(Setting(policy.removesuffix(ALL_TOKENS)))
            continue
        sizes = [Setting(policy, budget=b) for b in config.budgets] + [Setting(policy, ratio=r) for r in config.ratios]
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


class Results:
    """``results.jsonl``: one row per finished cell; rerunning skips what is there."""

    def __init__(self, path: Path):
        self.path = path
        self.done = set()
        if path.exists():
            for line in path.read_text().splitlines():
                if line.strip():
                    self.done.add(json.loads(line)["cell"])

    def pending(self, task: str, protocol: str, length: int, settings: list[Setting]) -> list[Setting]:
        return [s for s in settings if cell_key(task, protocol, length, s) not in self.done]

    def write(self, row: dict) -> None:
        with open(self.path, "a") as handle:
            handle.write(json.dumps(row) + "\n")
        self.done.add(row["cell"])


def environment(config: BenchConfig) -> dict:
    import transformers

    import tokensift

    return {
        "versions": {"tokensift": tokensift.__version__, "torch": torch.__version__, "transformers": transformers.__version__},
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(), "python": platform.python_version()},
        "seed": config.seed,
        "suite": config.suite,
    }


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
def greedy_tokens(model, cache, suffix: list[int], rows: int, max_new_tokens: int) -> list[list[int]]:
    """Append ``suffix`` to every row of ``cache`` and decode greedily."""
    decoder = Decoder(model, cache)
    seen = cache.get_seq_length()
    decoder.mask = torch.ones(rows, seen, dtype=torch.long)
    ids = torch.tensor([suffix] * rows)
    logits = decoder.forward(ids, torch.ones_like(ids))
    out = []
    for step in range(max_new_tokens):
        if step:
            logits = decoder.forward(next_ids[:, None], torch.ones(rows, 1, dtype=torch.long))
        next_ids = logits.argmax(-1)
        out.append(next_ids)
    return torch.stack(out, 1).tolist() if out else [[] for _ in range(rows)]


def run_retrieval(model, tokenizer, config, results, task, protocol, length, settings, progress) -> None:
    pending = results.pending(task, protocol, length, settings)
    if not pending:
        return
    instances = build_instances(task, tokenizer, length, config.samples, config.seed, protocol)
    scores = {s: [] for s in pending}
    kv = {s: [] for s in pending}
    started = time.perf_counter()
    for instance in instances:
        recording = record_prefill(model, torch.tensor([instance.context_ids]))
        policies = {s: s.build() for s in pending}
        merged = [s for s in pending if is_mergeable(policies[s])]
        alone = [s for s in pending if s not in merged]
        for start in range(0, len(merged), MERGE_ROWS):
            group = merged[start:start + MERGE_ROWS]
            caches = [replay(model, policies[s], recording) for s in group]
            for s, cache in zip(group, caches):
                kv[s].append((cache.kv_bytes, cache.kv_bytes_full, cache.kv_tokens()))
            texts = greedy_tokens(model, merge_caches(caches, model), instance.suffix_ids, len(group), instance.max_new_tokens)
            for s, tokens in zip(group, texts):
                scores[s].append(score(instance, tokenizer.decode(tokens, skip_special_tokens=True)))
            progress(len(group))
        for s in alone:
            cache = replay(model, policies[s], recording)
            cache.set_defer_eviction(True)  # same protocol as the merged rows
            kv[s].append((cache.kv_bytes, cache.kv_bytes_full, cache.kv_tokens()))
            tokens = greedy_tokens(model, cache, instance.suffix_ids, 1, instance.max_new_tokens)[0]
            scores[s].append(score(instance, tokenizer.decode(tokens, skip_special_tokens=True)))
            progress(1)
        del recording
    elapsed = time.perf_counter() - started
    for s in pending:
        extra = metrics.kv_summary(kv[s]) | {"wall_seconds_group": elapsed}
        results.write(make_row(task, protocol, length, s, config, scores[s], extra))


def decode_chunk(policy) -> int:
    """Tokens fed per forward when teacher forcing: reading policies read a subset only on
    single-token steps (blocks are dense), so they get one token at a time."""
    return 1 if getattr(policy, "reads_subset", False) else metrics.DECODE_CHUNK


@torch.inference_mode()
def teacher_forced_logits(model, cache, tokens: list[int], chunk: int) -> torch.Tensor:
    """Feed ``tokens`` in chunks of ``chunk`` (policy active after each); logits ``[n, vocab]``."""
    seen = cache.get_seq_length()
    mask = torch.ones(1, seen, dtype=torch.long)
    outputs = []
    for start in range(0, len(tokens), chunk):
        ids = torch.tensor([tokens[start:start + chunk]])
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
    recordings = [record_prefill(model, torch.tensor([instance.context_ids])) for instance in instances]
    for s in pending:
        nll, kv = [], []
        for instance, recording in zip(instances, recordings):
            policy = s.build()
            cache = replay(model, policy, recording)
            logits = teacher_forced_logits(model, cache, instance.suffix_ids[:-1], decode_chunk(policy))
            logits = torch.cat([recording.logits, logits])
            nll.append(float(torch.nn.functional.cross_entropy(logits, torch.tensor(instance.suffix_ids))))
            kv.append((cache.kv_bytes, cache.kv_bytes_full, cache.kv_tokens()))
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
        recording = record_prefill(model, torch.tensor([instance.context_ids]))
        full_cache = replay(model, build_policy("full"), recording)
        reference_tokens = greedy_tokens(model, full_cache, instance.suffix_ids, 1, instance.max_new_tokens)[0]
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
    budget = config.budgets[len(config.budgets) // 2] if config.budgets else None
    chosen = [s for s in settings if s.policy == "full" or s.budget == budget]
    pending = results.pending("cost", QUERY_AGNOSTIC, length, chosen)
    if not pending:
        return
    instance = build_instances("fidelity", tokenizer, length, 1, config.seed)[0]
    for s in pending:
        figures = metrics.measure_cost(model, tokenizer, instance.context_ids, s.build())
        results.write(make_row("cost", QUERY_AGNOSTIC, length, s, config, [figures["tokens_per_second"]], figures))
        progress(1)


def count_units(config: BenchConfig, settings: list[Setting]) -> int:
    retrieval = [t for t in config.tasks if t in RETRIEVAL_TASKS]
    units = len(retrieval) * len(config.protocols) * len(config.lengths) * config.samples * len(settings)
    units += ("ppl" in config.tasks) * config.ppl_samples * len(settings)
    units += ("fidelity" in config.tasks) * config.fidelity_samples * len(config.lengths) * len(settings)
    units += ("cost" in config.tasks) * len(config.cost_lengths) * len(config.policies)
    return units


def run_bench(config: BenchConfig, out: Path, model=None, tokenizer=None) -> None:
    """Run (or resume) the matrix in ``out`` and write the report and plots."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from tokensift.bench.report import write_report
    from tokensift.bench.tasks import default_tokenizer  # noqa: F401  (tasks registered)
    from tokensift.models import load_model

    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(asdict(config), indent=1))
    results = Results(out / "results.jsonl")
    if model is None:
        model, tokenizer = load_model(config.model)
    settings = settings_for(config)
    console = Console(stderr=True)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console) as bar:
        job = bar.add_task("bench", total=count_units(config, settings))
        advance = lambda n: bar.advance(job, n)  # noqa: E731
        for length in config.lengths:
            for protocol in config.protocols:
                for task in [t for t in config.tasks if t in RETRIEVAL_TASKS]:
                    bar.update(job, description=f"{task} {protocol} {length}")
                    run_retrieval(model, tokenizer, config, results, task, protocol, length, settings, advance)
            if "fidelity" in config.tasks:
                bar.update(job, description=f"fidelity {length}")
                run_fidelity(model, tokenizer, config, results, length, settings, advance)
        if "ppl" in config.tasks:
            bar.update(job, description=f"ppl {config.ppl_length}")
            run_ppl(model, tokenizer, config, results, settings, advance)
        if "cost" in config.tasks:
            for length in config.cost_lengths:
                bar.update(job, description=f"cost {length}")
                run_cost(model, tokenizer, config, results, length, settings, advance)
    write_report(out)
    console.print(f"results: {out / 'results.jsonl'}  report: {out / 'report.md'}")
