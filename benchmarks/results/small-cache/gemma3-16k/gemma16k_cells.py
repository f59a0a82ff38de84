"""Gemma 3 at 16k, niah: more cells on the prompts of runs/gemma16k_small, with the full-cache gate
off (the full cache scored 0.25, under the long suite's 0.3).

    python gemma16k_cells.py OUT POLICY [POLICY ...]     # POLICY as in --policies, e.g. "tiered(k=1024)@all"
    python gemma16k_cells.py runs/gemma16k_small         # the config's own policies
"""
import json
import sys
from pathlib import Path

from tokensift.bench.runner import BenchConfig, run_bench

fields = json.loads(Path("runs/gemma16k_small/config.json").read_text()) | {"full_gate": None}
out, policies = Path(sys.argv[1]), sys.argv[2:]
if policies:
    fields |= {"policies": policies, "budgets": []}
run_bench(BenchConfig(**fields), out)
