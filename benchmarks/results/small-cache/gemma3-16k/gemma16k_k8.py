"""Gemma 3 at 16k, niah: tiered with 8-bit window keys and 4-bit window values."""
import json
from pathlib import Path

from tokensift.bench.runner import BenchConfig, run_bench

fields = json.loads(Path("runs/gemma16k_small/config.json").read_text())
fields |= {"full_gate": None, "policies": ["tiered(k=256,window_key_bits=8)@all"], "budgets": []}
run_bench(BenchConfig(**fields), Path("runs/gemma16k_k8"))
