"""Compare two benchmark result files cell by cell: every field both record, timing left out.

    python benchmarks/compare_rows.py BEFORE.jsonl AFTER.jsonl

Prints the cells compared and every difference in a field both rows carry (a field only the
newer code records is not a difference). The ``cost`` task's score is a speed (tokens/s), so it
counts as timing.
"""

import json
import sys

TIMING = {"wall_seconds_group", "prefill_seconds", "decode_seconds", "peak_rss_bytes", "machine", "versions",
          "tokens_per_second", "seconds", "load"}


def rows(path: str) -> dict[str, dict]:
    with open(path) as handle:
        return {row["cell"]: row for row in map(json.loads, handle)}


def differences(before: dict, after: dict) -> list[tuple]:
    found = []
    for cell, old in before.items():
        new = after.get(cell)
        if new is None:
            found.append((cell, "missing after", None, None))
            continue
        speed = old.get("task") == "cost"
        for field, value in old.items():
            if field in TIMING or (speed and field in ("score", "sample_scores")):
                continue
            if value != new.get(field):
                found.append((cell, field, value, new.get(field)))
    return found


def main() -> None:
    before, after = rows(sys.argv[1]), rows(sys.argv[2])
    found = differences(before, after)
    print(f"{len(before)} cells before, {len(after)} after; {len(found)} differences outside timing")
    for difference in found:
        print(*difference, sep="\t")


if __name__ == "__main__":
    main()
