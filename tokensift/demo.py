"""``make demo``: a ~4k-token needle in a haystack of Paul Graham essays, answered by the
embedded model with the full cache, two eviction policies at a fixed budget, zipcache keeping
every token at 8/4 bits, and ``tiered`` holding a 2-bit key sketch (exact rows in a file).

Query-agnostic: the essays (with the needle) are prefilled and compressed first; the question
is appended only afterwards, so no policy can see what will be asked.
"""

from __future__ import annotations

import torch
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from tokensift.bench.tasks import get_task
from tokensift.bench.tasks.instance import QUERY_AGNOSTIC
from tokensift.generate import generate
from tokensift.models import load_model
from tokensift.policies import build_policy

EVICTING = ("streaming_llm", "snapkv")  # keep `budget` tokens per layer and KV head


def demo_policies(budget: int):
    """The full cache, two eviction policies at ``budget``, zipcache keeping every token at 8/4 bits, and
    ``tiered`` reading ``budget / 2`` exact rows per step from a second tier."""
    evicting = [build_policy(name, budget=budget) for name in EVICTING]
    return [build_policy("full"), *evicting, build_policy("zipcache", hi_bits=8, lo_bits=4),
            build_policy("tiered", k=budget // 2)]


def run_demo(budget: int = 512, length: int = 4096, samples: int = 3, seed: int = 0, device=None, dtype=None) -> list[dict]:
    """Run the demo (on ``device``, in ``dtype``: see ``load_model``), print a table, and return its rows."""
    console = Console()
    torch.manual_seed(seed)
    with console.status("loading the embedded model (SmolLM2-135M-Instruct)..."):
        model, tokenizer = load_model(device=device, dtype=dtype)
    task = get_task("niah")
    instances = [task.build(tokenizer, length, i, seed, QUERY_AGNOSTIC) for i in range(samples)]
    rows, policies = [], demo_policies(budget)
    progress = Progress(
        TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(), TimeRemainingColumn(), console=console,
    )
    with progress:
        bar = progress.add_task("needle prompts", total=len(policies) * samples)
        for policy in policies:
            correct, kv_bytes, smaller, speeds, answers = 0, 0, [], [], []
            for instance in instances:
                progress.update(bar, description=f"{policy.describe()} depth {instance.meta.get('depth')}")
                result = generate(
                    model, tokenizer, instance.context_ids, policy=policy, question=instance.suffix_ids,
                    max_new_tokens=instance.max_new_tokens,
                )
                text = result.text[0]
                correct += task.score(instance, text) == 1.0
                kv_bytes += result.kv_bytes
                smaller.append(result.kv_bytes_full_bf16 / result.kv_bytes_bf16)
                speeds.append(result.tokens_per_second)
                answers.append(text.strip().split("\n")[0][:24])
                progress.advance(bar)
            rows.append({
                "policy": policy.describe(), "correct": correct, "samples": samples,
                "kv_mb": kv_bytes / samples / 2**20, "x_smaller_bf16": sum(smaller) / len(smaller), "tokens_per_second": sum(speeds) / len(speeds),
                "answers": answers,
            })
    console.print(demo_table(rows, instances, length))
    return rows


def demo_table(rows: list[dict], instances, length: int) -> Table:
    gold = ", ".join(i.answers[0] for i in instances)
    table = Table(title=f"needle in a {length}-token haystack, question asked after compression (gold: {gold})")
    for column in ("policy", "answer correct?", "KV MB held", "x smaller than bf16 full", "tokens/s", "answers"):
        table.add_column(column, overflow="fold")  # narrow terminals wrap, never cut, a policy name
    for row in rows:
        table.add_row(
            row["policy"], f"{row['correct']}/{row['samples']}", f"{row['kv_mb']:.1f}", f"{row['x_smaller_bf16']:.1f}",
            f"{row['tokens_per_second']:.1f}", " | ".join(row["answers"]),
        )
    return table
