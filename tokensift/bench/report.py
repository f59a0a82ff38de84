"""``report.md`` and plots from ``results.jsonl`` (any mix of suites, lengths and libraries)."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from tokensift.bench.long_report import is_long, plot_long, section_long
from tokensift.bench.results import read_rows
from tokensift.bench.table import fmt, markdown_table  # noqa: F401  (re-exported)
from tokensift.bench.tasks import QUERY_AGNOSTIC, RETRIEVAL_TASKS
from tokensift.bench.timing import mean

HEADLINE_THRESHOLD = 0.5


def load_rows(path: Path) -> list[dict]:
    """The rows of a results file (:func:`~tokensift.bench.results.read_rows`)."""
    return read_rows(path)


def name_of(row: dict) -> str:
    """Policy label, prefixed with the library when it is not tokensift."""
    library = row.get("library", "tokensift")
    return row["policy"] if library == "tokensift" else f"{library}:{row['policy']}"


def size_of(row: dict) -> str:
    if row.get("budget") is not None:
        return str(row["budget"])
    return f"r{row['ratio']}" if row.get("ratio") is not None else "all"


def size_order(label: str) -> tuple:
    if label == "all":
        return (2, 0.0)
    return (1, float(label[1:])) if label.startswith("r") else (0, float(label))


def full_scores(rows: list[dict]) -> dict[tuple, float]:
    """(task, protocol, length) -> full-cache score."""
    return {(r["task"], r["protocol"], r["length"]): r["score"] for r in rows if r["policy"] == "full" and r["task"] in RETRIEVAL_TASKS}


def main_length(rows: list[dict]) -> int | None:
    lengths = sorted({r["length"] for r in rows if r["task"] in RETRIEVAL_TASKS})
    return 4096 if 4096 in lengths else (lengths[-1] if lengths else None)


def headline_tasks(rows: list[dict], length: int) -> list[str]:
    full = full_scores(rows)
    return [t for t in RETRIEVAL_TASKS if full.get((t, QUERY_AGNOSTIC, length), 0.0) >= HEADLINE_THRESHOLD]


def score_matrix(rows: list[dict], tasks: list[str], protocol: str, length: int) -> tuple[list[str], dict]:
    """Mean score over ``tasks`` per (policy label, size label); only complete cells."""
    cells = defaultdict(dict)
    for r in rows:
        if r["task"] in tasks and r["protocol"] == protocol and r["length"] == length and r.get("score") is not None:
            cells[(name_of(r), size_of(r))][r["task"]] = r["score"]
    sizes = sorted({size for (_, size) in cells}, key=size_order)
    matrix = {key: sum(v.values()) / len(tasks) for key, v in cells.items() if len(v) == len(tasks)}
    return sizes, matrix


def matrix_table(sizes: list[str], matrix: dict) -> str:
    policies = sorted({p for p, _ in matrix}, key=lambda p: (p != "full", p))
    body = [[p] + [fmt(matrix.get((p, s))) for s in sizes] for p in policies]
    return markdown_table(["policy"] + [f"budget {s}" for s in sizes], body)


def section_full(rows: list[dict]) -> str:
    full = full_scores(rows)
    if not full:
        return ""
    body = [[t, p, n, fmt(s)] for (t, p, n), s in sorted(full.items())]
    return "## Full-cache score per task\n\n" + markdown_table(["task", "protocol", "length", "full score"], body)


def section_headline(rows: list[dict]) -> str:
    length = main_length(rows)
    if length is None:
        return ""
    tasks = headline_tasks(rows, length)
    excluded = [t for t in RETRIEVAL_TASKS if t not in tasks and any(r["task"] == t for r in rows)]
    text = f"## Headline: mean score over tasks where the full cache scores >= {HEADLINE_THRESHOLD} ({length} tokens, query-agnostic)\n\n"
    text += f"Tasks in the average: {', '.join(tasks) or 'none'}. Left out (full cache below {HEADLINE_THRESHOLD}): {', '.join(excluded) or 'none'}.\n\n"
    if tasks:
        text += matrix_table(*score_matrix(rows, tasks, QUERY_AGNOSTIC, length))
    return text


def section_per_task(rows: list[dict]) -> str:
    parts = ["## Score per task"]
    for protocol in sorted({r["protocol"] for r in rows if r["task"] in RETRIEVAL_TASKS}):
        for length in sorted({r["length"] for r in rows if r["task"] in RETRIEVAL_TASKS}):
            for task in RETRIEVAL_TASKS:
                sizes, matrix = score_matrix(rows, [task], protocol, length)
                if matrix:
                    parts.append(f"### {task}, {protocol}, {length} tokens\n\n" + matrix_table(sizes, matrix))
    return "\n\n".join(parts) if len(parts) > 1 else ""


def section_metric(rows: list[dict], task: str, title: str, value) -> str:
    chosen = [r for r in rows if r["task"] == task]
    if not chosen:
        return ""
    sizes = sorted({size_of(r) for r in chosen}, key=size_order)
    matrix = {(name_of(r), size_of(r)): value(r) for r in chosen}
    policies = sorted({p for p, _ in matrix}, key=lambda p: (p != "full", p))
    body = [[p] + [matrix.get((p, s), "–") for s in sizes] for p in policies]
    return f"## {title}\n\n" + markdown_table(["policy"] + [f"budget {s}" for s in sizes], body)


def bf16_fraction(row: dict) -> float | None:
    """Bytes held relative to a bf16 full cache: measured for tokensift rows (every layer, packed
    codes and scales included); kvpress evicts in the model's dtype, so its kept fraction."""
    if row.get("kv_fraction_bf16") is not None:
        return row["kv_fraction_bf16"]
    return row.get("keep_ratio") if row.get("library") == "kvpress" else None


def memory_points(rows: list[dict], tasks: list[str], length: int) -> dict[tuple, list[dict]]:
    """(policy label, size label) -> its query-agnostic rows on ``tasks`` at ``length`` (complete cells only)."""
    cells = defaultdict(list)
    for r in rows:
        if r["task"] in tasks and r["length"] == length and r["protocol"] == QUERY_AGNOSTIC and bf16_fraction(r):
            cells[(name_of(r), size_of(r))].append(r)
    return {key: group for key, group in cells.items() if len({r["task"] for r in group}) == len(tasks)}


def section_memory(rows: list[dict]) -> str:
    length = main_length(rows)
    tasks = headline_tasks(rows, length) if length else []
    points = memory_points(rows, tasks, length) if tasks else {}
    if not points:
        return ""
    body = []
    for (policy, size), group in sorted(points.items(), key=lambda item: (mean(bf16_fraction(r) for r in item[1]), item[0])):
        fraction = mean(bf16_fraction(r) for r in group)
        fp32 = [r["kv_fraction"] for r in group if r.get("kv_fraction") is not None]
        tier = [r.get("tier_bytes", 0) for r in group]
        body.append([policy, size, fmt(mean(r["score"] for r in group)), fmt(1 / fraction, 1), fmt(fraction, 3),
                     fmt(mean(fp32), 3) if fp32 else "–", fmt(mean(tier) / 2**20, 1) if any(tier) else "–"])
    header = ["policy", "budget", "headline score", "x smaller than bf16 full", "bytes / bf16 full",
              "bytes / fp32 full (this run)", "second tier MiB"]
    return (
        f"## Memory: bytes held against a bf16 full cache ({length} tokens, {', '.join(tasks)})\n\n"
        "Bytes held after the context is compressed, every layer counted (codes, scales, zero-points, sketches "
        "and masks included). A second tier (`tiered`) holds the exact rows outside the resident cache "
        "(a memory-mapped file on this CPU run) and is not counted as held.\n\n" + markdown_table(header, body)
    )


def section_cost(rows: list[dict]) -> str:
    chosen = [r for r in rows if r["task"] == "cost"]
    if not chosen:
        return ""
    base = {r["length"]: r for r in chosen if r["policy"] == "full"}
    body = []
    for r in sorted(chosen, key=lambda r: (r["length"], r["policy"] != "full", r["policy"])):
        ref = base.get(r["length"], r)
        body.append([
            r["length"], name_of(r), size_of(r), fmt(r["kv_bytes"] / 2**20, 1), fmt(r["kv_bytes"] / ref["kv_bytes"]),
            fmt(r["prefill_seconds"]), fmt(r["prefill_seconds"] / ref["prefill_seconds"]),
            fmt(r["tokens_per_second"], 1), fmt(r["tokens_per_second"] / ref["tokens_per_second"]),
            fmt(r["peak_rss_bytes"] / 2**20, 0),
        ])
    header = ["length", "policy", "budget", "KV MiB", "KV / full", "prefill s", "prefill / full", "decode tok/s", "tok/s / full", "peak RSS MiB"]
    return "## Cost (same run; ratios against full)\n\n" + markdown_table(header, body)


def write_report(out: Path) -> None:
    rows = load_rows(out / "results.jsonl")
    sections = [
        "# tokensift benchmark report",
        describe_run(rows),
        section_long(rows) if is_long(rows) else "",
        section_headline(rows),
        section_memory(rows),
        section_full(rows),
        section_metric(rows, "ppl", "Perplexity of the last 512 tokens (policy active while they are fed)", lambda r: fmt(r["ppl"])),
        section_metric(rows, "fidelity", "Fidelity: fraction of the full cache's 64-token continuation reproduced / mean KL (nats)", lambda r: f"{fmt(r['score'])} / {fmt(r['kl'], 3)}"),
        section_cost(rows),
        section_per_task(rows),
    ]
    (out / "report.md").write_text("\n\n".join(s for s in sections if s) + "\n")
    write_plots(rows, out)


def describe_run(rows: list[dict]) -> str:
    if not rows:
        return "No results yet."
    first = rows[0]
    samples = sorted({r["samples"] for r in rows if r["task"] in RETRIEVAL_TASKS})
    libraries = sorted({r.get("library", "tokensift") for r in rows})
    kernels = sorted({r.get("kernels", "stock") for r in rows if r.get("library", "tokensift") == "tokensift"})
    threads = sorted({r.get("machine", {}).get("threads") for r in rows if r.get("machine", {}).get("threads")})
    models = sorted({r.get("model", "smollm2") for r in rows if r.get("library", "tokensift") == "tokensift"})
    return (
        f"Model: {', '.join(models)}. "
        f"Suite `{first.get('suite')}`, seed {first.get('seed')}, samples per retrieval cell {samples}, "
        f"libraries: {', '.join(libraries)}. Versions: {first.get('versions')}. Machine: {first.get('machine', {}).get('cpu')}, "
        f"threads per process {threads}; tokensift linear kernels: {', '.join(kernels)}.\n\n"
        "Protocol: query-agnostic = the context is prefilled and compressed first, then the question is "
        "appended and the answer decoded (no further eviction for evict-only policies, as in kvpress); "
        "`budget` = tokens kept per layer and KV head."
    )


def write_plots(rows: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    length = main_length(rows)
    if length is not None:
        plot_score_vs_budget(rows, length, out, plt)
        plot_score_vs_bytes(rows, length, out, plt)
    plot_speed_vs_length(rows, out, plt)
    if is_long(rows):
        plot_long(rows, out, plt)


LINE_STYLES = ("-", "--", ":", "-.")  # with markers, keep lines apart once the 10 default colors repeat


def plot_score_vs_budget(rows, length, out, plt) -> None:
    tasks = [t for t in RETRIEVAL_TASKS if any(r["task"] == t and r["length"] == length for r in rows)]
    compared = [t for t in tasks if any(r["task"] == t and r["length"] == length and r["policy"] != "full" for r in rows)]
    tasks = compared or tasks  # tasks run with the full cache only are in the report's table
    if not tasks:
        return
    labels = len({name_of(r) for r in rows if r["task"] in tasks and r["length"] == length})
    fig, axes = plt.subplots(1, len(tasks), figsize=(4 * len(tasks) + 2, max(3.6, 0.14 * labels)), squeeze=False)
    for axis, task in zip(axes[0], tasks):
        sizes, matrix = score_matrix(rows, [task], QUERY_AGNOSTIC, length)
        numeric = [s for s in sizes if s not in ("all",) and not s.startswith("r")]
        for index, policy in enumerate(sorted({p for p, _ in matrix})):
            if policy == "full":
                axis.axhline(matrix[("full", "all")], color="black", linestyle="--", label="full")
                continue
            points = [(float(s), matrix[(policy, s)]) for s in numeric if (policy, s) in matrix]
            if points:
                axis.plot(*zip(*points), marker="os^v"[index // 10 % 4], linestyle=LINE_STYLES[index // 10 % 4], label=policy)
        axis.set_xscale("log", base=2)
        axis.set_title(task)
        axis.set_xlabel("budget (tokens per head)")
        axis.set_ylim(-0.05, 1.05)
    axes[0][0].set_ylabel("score")
    busiest = max(axes[0], key=lambda axis: len(axis.get_lines()))  # the legend of the panel with every policy
    axes[0][-1].legend(*busiest.get_legend_handles_labels(), fontsize=6, loc="center left", bbox_to_anchor=(1, 0.5))
    fig.tight_layout()
    fig.savefig(out / "score_vs_budget.png", dpi=110)
    plt.close(fig)


def plot_score_vs_bytes(rows, length, out, plt) -> None:
    tasks = headline_tasks(rows, length)
    points = memory_points(rows, tasks, length) if tasks else {}
    if not points:
        return
    series = defaultdict(list)
    for (policy, _), group in points.items():
        series[policy].append((mean(bf16_fraction(r) for r in group), mean(r["score"] for r in group)))
    fig, axis = plt.subplots(figsize=(8, 5))
    for index, (policy, values) in enumerate(sorted(series.items())):
        values.sort()
        style = dict(marker="*", markersize=11) if policy == "full" else dict(marker="os^v"[index // 10 % 4], markersize=5)
        axis.plot(*zip(*values), linestyle=LINE_STYLES[index // 10 % 4], label=policy, **style)
    axis.plot(*pareto_front([v for values in series.values() for v in values]), color="grey", linewidth=4, alpha=0.3,
              label="frontier", zorder=0)
    axis.set_xscale("log")
    axis.set_xlabel("bytes held / bf16 full cache (log; every layer, scales and sketches counted)")
    axis.set_ylabel("headline score")
    axis.set_title(f"score vs memory ({length} tokens, query-agnostic)")
    axis.legend(fontsize=6, loc="center left", bbox_to_anchor=(1, 0.5))
    fig.tight_layout()
    fig.savefig(out / "score_vs_kv_bytes.png", dpi=110)
    plt.close(fig)


def pareto_front(points: list[tuple[float, float]]) -> tuple[list, list]:
    """The points no other point beats on both fewer bytes and a higher score, by bytes."""
    front, best = [], float("-inf")
    for fraction, score in sorted(points):
        if score > best:
            front.append((fraction, score))
            best = score
    return [p[0] for p in front], [p[1] for p in front]


def plot_speed_vs_length(rows, out, plt) -> None:
    chosen = [r for r in rows if r["task"] == "cost"]
    if not chosen:
        return
    series = defaultdict(list)
    for r in chosen:
        series[name_of(r)].append((r["length"], r["tokens_per_second"]))
    fig, axis = plt.subplots(figsize=(7, 4.5))
    for policy, values in sorted(series.items()):
        values.sort()
        axis.plot(*zip(*values), marker="o", label=policy)
    axis.set_xlabel("context length (tokens)")
    axis.set_ylabel("decode tokens/s")
    axis.set_title("decode speed vs context length")
    axis.legend(fontsize=6, loc="center left", bbox_to_anchor=(1, 0.5))
    fig.tight_layout()
    fig.savefig(out / "tokens_per_second_vs_length.png", dpi=110)
    plt.close(fig)
