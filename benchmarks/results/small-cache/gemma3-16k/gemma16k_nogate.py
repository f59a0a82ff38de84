"""Gemma 3 at 16k, niah: the long suite's cells with the full-cache gate off (full scored 0.25 < 0.3)."""
import json
from pathlib import Path

from tokensift.bench.runner import BenchConfig, run_bench

out = Path("runs/gemma16k_small")
fields = json.loads((out / "config.json").read_text())
fields["full_gate"] = None
config = BenchConfig(**fields)
run_bench(config, out)
