"""The ``spec-fresh`` suite: ``tokensift generate --speculate auto`` as a new user runs it, one fresh
process per generation, against the same command's plain decoding, on the spec suite's prompts
and, reported separately, on its held-out split (``spec_heldout.json``: fixed before any tuning,
never used to tune).

Arms per prompt, each a fresh ``tokensift generate ... --json`` process pinned to the same thread
count, started together (TOKENSIFT_SPEC_CONCURRENT=1, the default: on a machine shared with other
jobs, whatever load comes hits every arm alike, where one after the other a burst lands on one arm;
an arm that finishes first leaves the others more CPU, which favours the slower arm) or one after
the other in an order that rotates from prompt to prompt (0): ``plain``,
``auto`` (default warm start from the cache folder) and ``auto_cold`` (``--no-spec-warm``: empty
drafter state, as before the warm start); optional ``packed0`` (``--tree-nodes 0``: the speculative
loop's packed kernels without drafts, what the kernels give alone); optional ``plain_int8`` (``--weights int8``: W8A8 linears, another, faster model; speculation
over it is refused, see :mod:`tokensift.int8_linears`; results rows of an ``auto_int8`` arm, from
before that, are still reported against ``plain_int8``). Speedups are ratios of the CLI's own decode tokens/s of
the same prompt in the same run, geometric means per category.

Knobs: TOKENSIFT_SPEC_PROMPTS (suite prompts per category, 2), TOKENSIFT_SPEC_TOKENS (128),
TOKENSIFT_SPEC_THREADS (1: every process pinned to the same thread count through
OMP_NUM_THREADS), TOKENSIFT_SPEC_SPLITS (``suite,heldout``), TOKENSIFT_SPEC_ARMS
(``plain,auto,auto_cold``), TOKENSIFT_SPEC_REPEATS (1), TOKENSIFT_SPEC_CONCURRENT (1).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from tokensift.bench.results import append_rows, read_rows, read_run, write_run
from tokensift.bench.spec_suite import CATEGORIES, _env, spec_prompts
from tokensift.bench.suite import Suite
from tokensift.bench.table import fmt, markdown_table
from tokensift.bench.timing import geomean, load_1min, load_averages, mean
from tokensift.errors import TokensiftError

HELDOUT_FILE = Path(__file__).with_name("spec_heldout.json")
ARM_FLAGS = {"plain": [], "auto": ["--speculate", "auto"], "auto_cold": ["--speculate", "auto", "--no-spec-warm"],
             "packed0": ["--speculate", "auto", "--tree-nodes", "0"],
             "plain_int8": ["--weights", "int8"]}


# llama.cpp arms (llama-cpp-python in its own venv, TOKENSIFT_LLAMACPP_PYTHON): drafted tokens of its
# prompt lookup decoding, 0 = its plain greedy; SmolLM2 only (the embedded GGUF, run natively).
LLAMACPP_ARMS = {"llamacpp_plain": 0, "llamacpp_lookup10": 10, "llamacpp_lookup2": 2}
LLAMACPP_PYTHON = ".venv-llamacpp/bin/python"


def plain_arm(arm: str) -> str:
    """The plain decoding an arm must reproduce: ``plain_int8`` for the W8A8 model's arms,
    ``llamacpp_plain`` for llama.cpp's."""
    if arm.startswith("llamacpp_"):
        return "llamacpp_plain"
    return "plain_int8" if arm.endswith("_int8") else "plain"


def llamacpp_python() -> str:
    """The interpreter of the venv holding llama-cpp-python (a one-line error if it is missing)."""
    python = os.environ.get("TOKENSIFT_LLAMACPP_PYTHON", LLAMACPP_PYTHON)
    if not Path(python).is_file():
        raise TokensiftError(f"llama.cpp arms need llama-cpp-python in its own venv: {python} not found "
                             "(set TOKENSIFT_LLAMACPP_PYTHON; see benchmarks/results/spec-fresh/llamacpp/RUN.md)")
    return python


def start_llamacpp(job_file: Path, arm: str, input_ids: list[int], new_tokens: int, threads: int, eos_ids) -> subprocess.Popen:
    """Start one fresh llama.cpp process (``llamacpp_worker.py``) on the embedded GGUF."""
    from tokensift.models import smollm2_gguf

    job_file.write_text(json.dumps({"gguf": str(smollm2_gguf()), "input_ids": input_ids, "new_tokens": new_tokens,
                                    "eos_ids": [e for e in eos_ids if e is not None], "threads": threads,
                                    "lookup": LLAMACPP_ARMS[arm]}))
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    return subprocess.Popen([llamacpp_python(), str(Path(__file__).with_name("llamacpp_worker.py")), str(job_file)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def heldout_prompts(tokenizer) -> list[dict]:
    """The held-out split: ``{"category", "name", "text"}`` with the chat template applied."""
    prompts = []
    for item in json.loads(HELDOUT_FILE.read_text())["prompts"]:
        text = item.get("text")
        if text is None:
            messages = [{"role": role, "content": content} for role, content in item["turns"]]
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        prompts.append({"category": item["category"], "name": item["name"], "text": text})
    return prompts


def start_cli(prompt_file: Path, arm: str, new_tokens: int, threads: int, model: str | None, device: str,
              dtype: str) -> subprocess.Popen:
    """Start one fresh ``tokensift generate --json`` process."""
    command = [sys.executable, "-c", "from tokensift.cli import main; main()", "generate", "--prompt-file", str(prompt_file),
               "--max-new-tokens", str(new_tokens), "--device", device, "--dtype", dtype, "--json", *ARM_FLAGS[arm]]
    if model is not None:
        command += ["--model", model]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def finish_cli(process: subprocess.Popen, arm: str) -> dict:
    """Wait for a process from :func:`start_cli`; returns its JSON."""
    stdout, stderr = process.communicate()
    if process.returncode != 0:
        raise RuntimeError(f"{arm} failed: {stderr.strip().splitlines()[-1] if stderr.strip() else process.returncode}")
    return json.loads(stdout.strip().splitlines()[-1])


def run_spec_fresh(out_dir: Path, model: str | None = None, device: str = "cpu", dtype: str = "float32") -> None:
    """Run the suite; writes results.jsonl and report.md into ``out_dir`` (a rerun resumes)."""
    from tokensift.models import load_model

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    per_category = _env("TOKENSIFT_SPEC_PROMPTS", 2)
    new_tokens = _env("TOKENSIFT_SPEC_TOKENS", 128)
    threads = _env("TOKENSIFT_SPEC_THREADS", 1)
    repeats = _env("TOKENSIFT_SPEC_REPEATS", 1)
    concurrent = bool(_env("TOKENSIFT_SPEC_CONCURRENT", 1))
    splits = os.environ.get("TOKENSIFT_SPEC_SPLITS", "suite,heldout").split(",")
    arms = [a for a in os.environ.get("TOKENSIFT_SPEC_ARMS", "plain,auto,auto_cold").split(",") if a in ARM_FLAGS or a in LLAMACPP_ARMS]
    if any(arm in LLAMACPP_ARMS for arm in arms):
        if model not in (None, "smollm2"):
            raise TokensiftError("the llama.cpp arms run the embedded SmolLM2 GGUF only (drop --model)")
        llamacpp_python()
    _, tokenizer = load_model(model)
    prompts = []
    if "suite" in splits:
        prompts += [dict(p, split="suite") for p in spec_prompts(tokenizer, 4) if int(p["name"].rsplit("-", 1)[1]) < per_category]
    if "heldout" in splits:
        prompts += [dict(p, split="heldout") for p in heldout_prompts(tokenizer)]
    order = sorted(range(len(prompts)), key=lambda i: (int(prompts[i]["name"].rsplit("-", 1)[1]), i))  # categories interleaved
    results_path = out_dir / "results.jsonl"
    done = {(r["prompt"], r["arm"], r.get("repeat", 0)) for r in read_rows(results_path, repair=True)}
    load_before = load_averages(digits=None)
    with tempfile.TemporaryDirectory() as folder:
        for position, index in enumerate(order):
            prompt = prompts[index]
            prompt_file = Path(folder) / f"{prompt['name']}.txt"
            prompt_file.write_text(prompt["text"], encoding="utf-8")
            # llama.cpp arms get the ids tokensift's CLI feeds its model
            input_ids = tokenizer(prompt["text"])["input_ids"] if any(arm in LLAMACPP_ARMS for arm in arms) else None
            for repeat in range(repeats):
                rotated = arms[(position + repeat) % len(arms):] + arms[:(position + repeat) % len(arms)]
                rotated = [arm for arm in rotated if (prompt["name"], arm, repeat) not in done]
                before = load_1min()

                def start(arm):
                    if arm in LLAMACPP_ARMS:
                        return start_llamacpp(Path(folder) / f"{arm}.json", arm, input_ids, new_tokens, threads,
                                              [tokenizer.eos_token_id])
                    return start_cli(prompt_file, arm, new_tokens, threads, model, device, dtype)

                if concurrent:  # every arm at once: whatever else runs hits them alike
                    started = {arm: start(arm) for arm in rotated}
                    outputs = {arm: finish_cli(process, arm) for arm, process in started.items()}
                else:
                    outputs = {arm: finish_cli(start(arm), arm) for arm in rotated}
                for arm, out in outputs.items():
                    record = {"split": prompt["split"], "category": prompt["category"], "prompt": prompt["name"], "arm": arm,
                              "repeat": repeat, "threads": threads, "tokens_per_second": out["tokens_per_second"],
                              "new_tokens": out["new_tokens"], "prompt_tokens": out["prompt_tokens"],
                              "prefill_seconds": out.get("prefill_seconds"), "decode_seconds": out.get("decode_seconds"),
                              "steps": out.get("steps"), "accepted_per_step": out.get("accepted_per_step"),
                              "mean_tree_nodes": out.get("mean_tree_nodes"), "accepted_by_drafter": out.get("accepted_by_drafter"),
                              "token_ids": out["token_ids"], "concurrent": concurrent, "load_before": before,
                              "load_after": load_1min()}
                    append_rows(results_path, [record])
                    print(f"[spec-fresh] {prompt['name']} {arm}: {record['tokens_per_second']:.1f} tok/s", flush=True)
    write_run(out_dir, {"load_before": load_before, "load_after": load_averages(digits=None), "new_tokens": new_tokens,
                        "threads": threads})
    report(out_dir)


def report(out_dir: Path) -> None:
    """report.md from ``out_dir``'s results.jsonl and run.json."""
    facts = read_run(out_dir)
    write_report(Path(out_dir), read_rows(Path(out_dir) / "results.jsonl"), facts["load_before"], facts["load_after"],
                 facts["new_tokens"], facts["threads"])


def _cell(value: float, suffix: str = "") -> str:
    return fmt(value, 2, suffix, missing="-", nan_missing=True)


def write_report(out_dir: Path, records: list[dict], load_before, load_after, new_tokens: int, threads: int) -> None:
    by = {(r["prompt"], r["arm"], r.get("repeat", 0)): r for r in records}
    arms = list(dict.fromkeys(r["arm"] for r in records))

    def ratios(a, b, sel):
        out = []
        for r in sel:
            if r["arm"] != a:
                continue
            base = by.get((r["prompt"], b, r.get("repeat", 0)))
            if base and base["tokens_per_second"] > 0:
                out.append(r["tokens_per_second"] / base["tokens_per_second"])
        return out

    reference = {(r["prompt"], r["arm"], r.get("repeat", 0)): r["token_ids"] for r in records if r["arm"] == plain_arm(r["arm"])}

    def identical(arm: str) -> str:
        same = [r["token_ids"] == reference[(r["prompt"], plain_arm(arm), r.get("repeat", 0))] for r in records
                if r["arm"] == arm and (r["prompt"], plain_arm(arm), r.get("repeat", 0)) in reference]
        return f"`{arm}` {sum(same)}/{len(same)}"

    checked = [a for a in arms if a != plain_arm(a)]
    ours = [identical(a) for a in checked if not a.startswith("llamacpp_")]
    theirs = [identical(a) for a in checked if a.startswith("llamacpp_")]
    lines = [f"# spec-fresh: `tokensift generate --speculate auto`, one fresh process per generation ({threads} thread(s) each)", "",
             f"{new_tokens} new tokens (or EOS); the arms of a prompt "
             f"{'ran at the same time' if all(r.get('concurrent') for r in records) else 'ran one after the other (order rotated)'}; "
             f"load average (1/5/15 min) before "
             f"{tuple(round(x, 2) for x in load_before)}, after {tuple(round(x, 2) for x in load_after)} on a 2-core machine "
             "shared with other jobs. Speedup = ratio of the CLI's decode tokens/s to plain decoding of the same prompt in the "
             "same run, geometric mean per category. `auto`: default warm start; `auto_cold`: `--no-spec-warm`.", "",
             f"Greedy outputs identical to plain decoding of the same model (runs): {', '.join(ours) or '-'}"
             f"{' (`auto_int8` against `plain_int8`: `--weights int8` is another model)' if 'auto_int8' in arms else ''}.", ""]
    if "llamacpp_plain" in arms:
        lines += ["`llamacpp_*`: llama-cpp-python (its own venv, a fresh process per generation, same thread count, the "
                  "same input ids) on the same GGUF file, whose quantized weights (Q4_1) llama.cpp runs natively while "
                  "tokensift runs them dequantized to fp32: compare each system's speculation with its own plain decoding. "
                  "`llamacpp_lookupN`: its prompt lookup decoding with N drafted tokens; greedy outputs identical to "
                  f"`llamacpp_plain` (runs): {', '.join(theirs)}.", ""]
    pairs = [(a, "plain") for a in arms if a != "plain" and not a.startswith("llamacpp_")]
    pairs += [("auto", "auto_cold")] if {"auto", "auto_cold"} <= set(arms) else []
    pairs += [("auto_int8", "plain_int8")] if {"auto_int8", "plain_int8"} <= set(arms) else []
    pairs += [(a, "llamacpp_plain") for a in arms if a.startswith("llamacpp_lookup") and "llamacpp_plain" in arms]
    for split in ("suite", "heldout"):
        sel_split = [r for r in records if r["split"] == split]
        if not sel_split:
            continue
        title = "Spec-suite prompts" if split == "suite" else "Held-out split (fixed before tuning, never used to tune)"
        header = ["category", "prompts", *(f"tok/s {a}" for a in arms), *(f"tokens/step {a}" for a in arms if a != "plain"),
                  *(f"{a} vs {b}" for a, b in pairs)]
        cat_rows, body = {}, []
        for category in CATEGORIES + ("overall",):
            sel = sel_split if category == "overall" else [r for r in sel_split if r["category"] == category]
            if not sel:
                continue
            if category == "overall":
                row = {p: geomean([cat_rows[c][p] for c in cat_rows]) for p in pairs}
            else:
                row = {p: geomean(ratios(*p, sel)) for p in pairs}
                cat_rows[category] = row
            count = len({r["prompt"] for r in sel})
            body.append([category, count, *(_cell(mean([r["tokens_per_second"] for r in sel if r["arm"] == a])) for a in arms),
                         *(_cell(mean([r["accepted_per_step"] or float("nan") for r in sel if r["arm"] == a]))
                           for a in arms if a != "plain"),
                         *(_cell(row[p], "x") for p in pairs)])
        lines += [f"## {title}", "", markdown_table(header, body), ""]
    body = []
    for key in dict.fromkeys((r["split"], r["prompt"], r.get("repeat", 0)) for r in records):
        split, prompt, repeat = key
        cells = []
        for a in arms:
            r, base = by.get((prompt, a, repeat)), by.get((prompt, plain_arm(a), repeat))
            if r is None:
                cells.append("")
            elif a == plain_arm(a) or base is None:
                cells.append(fmt(r["tokens_per_second"], 1))
            else:
                cells.append(f"{fmt(r['tokens_per_second'], 1)} ({fmt(r['tokens_per_second'] / base['tokens_per_second'], 2, 'x')})")
        body.append([split, f"{prompt}{'' if not repeat else f' #{repeat}'}", *cells])
    lines += ["Per prompt (tok/s; ratio to the same model's plain decoding):", "", markdown_table(["split", "prompt", *arms], body)]
    (out_dir / "report.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


SUITE = Suite(names=("spec-fresh",), options=("model",), runner=f"{__name__}:run_spec_fresh", reporter=f"{__name__}:report")
