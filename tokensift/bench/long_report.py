"""The long-context part of ``report.md``: every length side by side (the ``long`` suite).

Per length: each task's full-cache score (tasks below ``LONG_THRESHOLD`` are listed and left
out of the headline), the headline mean per policy and budget with the KV fraction it holds,
and ``score_vs_budget_by_length.png`` (one panel per length). On a model with sliding-window
layers (Gemma 3) the policies act on the full-attention layers only; ``kv_bytes`` counts every
layer, so the window layers bound how small the cache can get.
"""

from __future__ import annotations

from collections import defaultdict

from tokensift.bench.tasks import QUERY_AGNOSTIC, RETRIEVAL_TASKS

LONG_THRESHOLD = 0.3


def lengths_of(rows: list[dict]) -> list[int]:
    return sorted({r["length"] for r in rows if r["task"] in RETRIEVAL_TASKS})


def is_long(rows: list[dict]) -> bool:
    return any(r.get("suite") == "long" for r in rows)


def full_by_task(rows: list[dict]) -> dict:
    """(task, length) -> full-cache row (tokensift, query-agnostic)."""
    return {(r["task"], r["length"]): r for r in rows if r["policy"] == "full" and r.get("library", "tokensift") == "tokensift"
            and r["task"] in RETRIEVAL_TASKS and r["protocol"] == QUERY_AGNOSTIC}


def included_tasks(rows: list[dict], length: int) -> list[str]:
    full = full_by_task(rows)
    return [t for t in RETRIEVAL_TASKS if (t, length) in full and (full[(t, length)]["score"] or 0.0) >= LONG_THRESHOLD]


def headline(rows: list[dict], length: int) -> dict:
    """(label, size) -> (mean score over the included tasks, mean KV fraction); complete cells only."""
    from tokensift.bench.report import name_of, size_of

    tasks = included_tasks(rows, length)
    cells = defaultdict(dict)
    for r in rows:
        if r["task"] in tasks and r["length"] == length and r["protocol"] == QUERY_AGNOSTIC and r.get("score") is not None:
            cells[(name_of(r), size_of(r))][r["task"]] = (r["score"], r.get("kv_fraction"))
    out = {}
    for key, per_task in cells.items():
        if len(per_task) == len(tasks):
            fractions = [f for _, f in per_task.values() if f is not None]
            out[key] = (sum(s for s, _ in per_task.values()) / len(tasks), sum(fractions) / len(fractions) if fractions else None)
    return out


def section_long(rows: list[dict]) -> str:
    from tokensift.bench.report import size_order
    from tokensift.bench.table import fmt, markdown_table

    lengths = lengths_of(rows)
    if not lengths:
        return ""
    full = full_by_task(rows)
    parts = [f"## Long context: every length (full-cache threshold {LONG_THRESHOLD})"]
    model = sorted({r.get("model", "smollm2") for r in rows if r.get("library", "tokensift") == "tokensift"})
    parts.append(
        f"Model: {', '.join(model)}. Budgets are tokens kept per full-attention layer and KV head. On Gemma 3 the "
        "policies act on its 3 full-attention layers (5, 11, 17); its 15 sliding-window layers keep their last 511 "
        "tokens whatever the policy, and `KV / full` counts every layer, so the window layers set a floor on it."
    )
    tasks = [t for t in RETRIEVAL_TASKS if any((t, n) in full for n in lengths)]
    body = []
    for task in tasks:
        cells = []
        for n in lengths:
            row = full.get((task, n))
            cells.append("–" if row is None else f"{fmt(row['score'])} ({row['samples']})" + ("" if row["score"] >= LONG_THRESHOLD else " left out"))
        body.append([task] + cells)
    parts.append("### Full-cache score per task (prompts)\n\n" + markdown_table(["task"] + [f"{n} tokens" for n in lengths], body))
    for n in lengths:
        table = headline(rows, n)
        chosen = included_tasks(rows, n)
        if not table or not chosen:
            continue
        sizes = sorted({s for _, s in table}, key=size_order)
        policies = sorted({p for p, _ in table}, key=lambda p: (p != "full", p))
        lines = []
        for policy in policies:
            lines.append([policy] + [
                "–" if (policy, s) not in table else f"{fmt(table[(policy, s)][0])} ({fmt(table[(policy, s)][1])})" for s in sizes
            ])
        parts.append(
            f"### {n} tokens: mean score over {', '.join(chosen)} (KV / full in parentheses)\n\n"
            + markdown_table(["policy"] + [f"budget {s}" for s in sizes], lines)
        )
    return "\n\n".join(parts)


def plot_long(rows: list[dict], out, plt) -> None:
    """``score_vs_budget_by_length.png``: headline mean against budget, one panel per length."""
    lengths = [n for n in lengths_of(rows) if headline(rows, n)]
    if not lengths:
        return
    fig, axes = plt.subplots(1, len(lengths), figsize=(5 * len(lengths) + 2, 4.2), squeeze=False)
    for axis, n in zip(axes[0], lengths):
        table = headline(rows, n)
        policies = sorted({p for p, _ in table})
        for index, policy in enumerate(policies):
            if (policy, "all") in table and policy == "full":
                axis.axhline(table[(policy, "all")][0], color="black", linestyle="--", label="full")
                continue
            points = sorted((float(s), v[0]) for (p, s), v in table.items() if p == policy and s.replace(".", "").isdigit())
            if points:
                axis.plot(*zip(*points), marker="os^v"[index // 10 % 4], linestyle=("-", "--", ":", "-.")[index // 10 % 4], label=policy)
        axis.set_xscale("log", base=2)
        axis.set_ylim(-0.05, 1.05)
        axis.set_title(f"{n} tokens: {', '.join(included_tasks(rows, n))}", fontsize=8)
        axis.set_xlabel("budget (tokens per full-attention layer and head)")
    axes[0][0].set_ylabel("mean score")
    busiest = max(axes[0], key=lambda axis: len(axis.get_lines()))
    axes[0][-1].legend(*busiest.get_legend_handles_labels(), fontsize=6, loc="center left", bbox_to_anchor=(1, 0.5))
    fig.tight_layout()
    fig.savefig(out / "score_vs_budget_by_length.png", dpi=110)
    plt.close(fig)
