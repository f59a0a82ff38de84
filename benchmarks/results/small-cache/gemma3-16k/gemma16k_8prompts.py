"""Gemma 3 at 16k, niah, 8 prompts (the first 4 are 4-prompt-diagnosis/'s), query-agnostic, with the
full-cache gate off: full, tiered(k=1024) and tiered(k=1024,window_key_bits=8).

    python benchmarks/results/small-cache/gemma3-16k/gemma16k_8prompts.py runs/gemma16k_v2
"""
import json
import sys
from pathlib import Path

from tokensift.bench.runner import BenchConfig, run_bench

fields = json.loads((Path(__file__).parent / "4-prompt-diagnosis" / "config.json").read_text())
fields |= {"samples": 8, "budgets": [], "full_gate": None,
           "policies": ["full", "tiered(k=1024)@all", "tiered(k=1024,window_key_bits=8)@all"]}
run_bench(BenchConfig(**fields), Path(sys.argv[1]))
