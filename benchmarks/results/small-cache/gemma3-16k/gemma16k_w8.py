"""Gemma 3 at 16k, niah: which part of tiered loses the needle full finds (more rows read, exact windows)."""
import json
from pathlib import Path

from tokensift.bench.runner import BenchConfig, run_bench

fields = json.loads(Path("runs/gemma16k_small/config.json").read_text())
fields |= {"full_gate": None, "policies": ["tiered(k=256,window_bits=8)@all"], "budgets": []}
run_bench(BenchConfig(**fields), Path("runs/gemma16k_w8"))
