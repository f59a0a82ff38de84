"""Merge benchmark folders (e.g. the bench run and the kvpress side by side) into one results folder.

Usage: python benchmarks/merge_shards.py DIR [DIR ...]   (see results/standard/RUN.md)

The first row of a cell wins. Writes benchmarks/results/standard/results.jsonl, report.md and plots.
"""

import json
import sys
from pathlib import Path

from tokensift.bench.report import load_rows, write_report

OUT = Path("benchmarks/results/standard")


def shard_rows(shard: Path) -> list[dict]:
    path = shard / "results.jsonl"
    if not path.exists():
        print(f"missing {path}")
        return []
    return [row | {"shard": shard.name} for row in load_rows(path)]


def main(shards: list[str]) -> None:
    seen, rows = set(), []
    for shard in shards:
        for row in shard_rows(Path(shard)):
            if row["cell"] not in seen:
                seen.add(row["cell"])
                rows.append(row)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "results.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    write_report(OUT)
    print(f"{len(rows)} rows -> {OUT}")


if __name__ == "__main__":
    main(sys.argv[1:])
