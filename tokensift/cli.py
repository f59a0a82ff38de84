"""The ``tokensift`` command line: policies, generate, demo, bench, vision."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from tokensift.bench.suite import REGISTRY, split_list, top_level_items  # noqa: F401  (split_list, top_level_items: used here and re-exported)
from tokensift.errors import TokensiftError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Decide which tokens matter, training-free.")
console = Console(stderr=True)


def parse_settings(settings: list[str] | None) -> dict[str, str]:
    """``["k=v", ...]`` -> ``{"k": "v"}`` with a one-line error on malformed items."""
    out = {}
    for item in settings or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise TokensiftError(f"--set expects key=value, got '{item}'")
        out[key.strip()] = value.strip()
    return out


@app.command()
def policies() -> None:
    """List every registered policy with its parameters and paper."""
    from tokensift.policies import POLICIES

    table = Table(title="tokensift policies")
    for column in ("policy", "parameters (defaults)", "paper"):
        table.add_column(column, overflow="fold")
    for name, cls in sorted(POLICIES.items()):
        fields = ", ".join(f"{f.name}={f.default}" for f in dataclasses.fields(cls))
        table.add_row(name, fields, cls.paper)
    Console().print(table)


@app.command()
def prefills() -> None:
    """List every prefill policy (which prompt tokens each layer computes) with its parameters and paper."""
    from tokensift.prefill import PREFILLS

    table = Table(title="tokensift prefill policies")
    for column in ("prefill", "parameters (defaults)", "paper"):
        table.add_column(column, overflow="fold")
    for name, cls in sorted(PREFILLS.items()):
        fields = ", ".join(f"{f.name}={f.default}" for f in dataclasses.fields(cls))
        table.add_row(name, fields, cls.paper)
    Console().print(table)


DEVICE_HELP = "cpu (default), cuda, cuda:N, mps or auto."
DTYPE_HELP = "float32 (default, the exact reference), bfloat16 or float16."


def text_printer(tokenizer):
    """``(on_token, finish)`` that print generated text as it comes, never splitting a character."""
    from tokensift.streaming import IncrementalText

    text = IncrementalText(tokenizer)

    def on_token(token: int) -> None:
        print(text.push(token), end="", flush=True)

    def finish() -> None:
        print(text.flush())

    return on_token, finish


def read_prompt(prompt: str | None, prompt_file: Path | None) -> str:
    if (prompt is None) == (prompt_file is None):
        raise TokensiftError("give exactly one of --prompt TEXT or --prompt-file FILE")
    if prompt_file is None:
        return prompt
    if not prompt_file.is_file():
        raise TokensiftError(f"prompt file not found: {prompt_file}")
    return prompt_file.read_text(encoding="utf-8")


def check_numbers(max_new_tokens: int, prefill_chunk: int | None, temperature: float, top_p: float) -> None:
    """One-line errors for generation numbers no run can use (before any model is loaded)."""
    if max_new_tokens < 0:
        raise TokensiftError(f"--max-new-tokens must be >= 0 (got {max_new_tokens})")
    if prefill_chunk is not None and prefill_chunk < 1:
        raise TokensiftError(f"--prefill-chunk must be >= 1 (got {prefill_chunk})")
    if not 0.0 <= temperature < float("inf"):
        raise TokensiftError(f"--temperature must be a finite number >= 0 (got {temperature})")
    if not 0.0 < top_p <= 1.0:
        raise TokensiftError(f"--top-p must be in (0, 1] (got {top_p})")


@app.command()
def generate(
    prompt: Optional[str] = typer.Option(None, "--prompt", help="Prompt text."),
    prompt_file: Optional[Path] = typer.Option(None, "--prompt-file", help="Read the prompt from a file."),
    question: Optional[str] = typer.Option(None, "--question", help="Appended after the prompt is compressed (query-agnostic)."),
    model: Optional[str] = typer.Option(None, "--model", help="smollm2 (default), gemma3, a .gguf, a folder or a hub id."),
    device: str = typer.Option("cpu", "--device", help=DEVICE_HELP),
    dtype: str = typer.Option("float32", "--dtype", help=DTYPE_HELP),
    policy: str = typer.Option("full", "--policy", help="Policy name (see `tokensift policies`)."),
    budget: Optional[int] = typer.Option(None, "--budget", help="Tokens kept per layer and KV head."),
    ratio: Optional[float] = typer.Option(None, "--ratio", help="Fraction of tokens kept (0-1)."),
    settings: Optional[list[str]] = typer.Option(None, "--set", help="Policy parameter key=value (repeatable)."),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens"),
    temperature: float = typer.Option(0.0, "--temperature", help="0 = greedy."),
    top_p: float = typer.Option(1.0, "--top-p"),
    top_k: int = typer.Option(0, "--top-k", help="Sample among the k likeliest tokens (0 = off)."),
    repetition_penalty: float = typer.Option(1.0, "--repetition-penalty", help="transformers' penalty (1 = off)."),
    stop: Optional[list[str]] = typer.Option(None, "--stop", help="Stop after this string appears (repeatable)."),
    seed: int = typer.Option(0, "--seed"),
    chat: bool = typer.Option(False, "--chat", help="Wrap the prompt in the model's chat template."),
    prefill_chunk: Optional[int] = typer.Option(None, "--prefill-chunk", help="Prefill in chunks (policy acts after each)."),
    prefill: str = typer.Option("full", "--prefill", help="Prefill policy: full | lazyllm | gemfilter (see `tokensift prefills`)."),
    prefill_settings: Optional[list[str]] = typer.Option(None, "--prefill-set", help="Prefill parameter key=value (repeatable)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
    speculate: Optional[str] = typer.Option(
        None, "--speculate", help="Lossless draft-free speculative decoding: recycling | prompt_lookup | lookahead | auto."
    ),
    tree_nodes: Optional[int] = typer.Option(
        None, "--tree-nodes", help="With --speculate: verify a fixed number of draft nodes (default: adaptive, cost-aware)."
    ),
    spec_state: Optional[Path] = typer.Option(
        None, "--spec-state", help="With --speculate: load the drafter state (recycling matrix, acceptance history, n-grams) "
        "from this .npz instead of the warm start (if present) and save it after."
    ),
    spec_warm: bool = typer.Option(
        True, "--spec-warm/--no-spec-warm", help="With --speculate: start from the drafter state learned once from shipped "
        "text (kept in the cache folder, built on first use)."
    ),
    exact_int8_head: bool = typer.Option(
        False, "--exact-int8-head", help="Greedy tokens from an int8 copy of the output layer, exactly the fp32 argmax "
        "(fp32 CPU models; with sampling or --repetition-penalty the fp32 layer is used, same output)."
    ),
    weights: str = typer.Option(
        "model", "--weights", help="model: the linear layers as loaded; int8: W8A8 linears (int8 weights and per-row "
        "int8 activations, SmoothQuant-calibrated on shipped text): another, faster model, for plain decoding (not with "
        "--speculate)."
    ),
) -> None:
    """Generate text with a KV policy and report what the cache held."""
    from tokensift.generate import generate as run_generate
    from tokensift.models import load_model
    from tokensift.policies import build_policy
    from tokensift.prefill import build_prefill

    if budget is not None and ratio is not None:
        raise TokensiftError("give --budget or --ratio, not both")
    check_numbers(max_new_tokens, prefill_chunk, temperature, top_p)
    chosen = build_policy(policy, budget=budget, ratio=ratio, **parse_settings(settings))
    prefill_policy = build_prefill(prefill, **parse_settings(prefill_settings))
    if speculate is not None:
        from tokensift.speculative import DRAFTER_NAMES

        if speculate not in DRAFTER_NAMES:
            raise TokensiftError(f"unknown drafter '{speculate}'; use one of: {', '.join(DRAFTER_NAMES)}")
        if question is not None:
            raise TokensiftError("--question is not supported with --speculate")
        if tree_nodes is not None and tree_nodes < 0:
            raise TokensiftError(f"--tree-nodes must be >= 0 (got {tree_nodes})")
    elif tree_nodes is not None or spec_state is not None:
        raise TokensiftError("--tree-nodes and --spec-state need --speculate")
    if weights not in ("model", "int8"):
        raise TokensiftError(f"unknown --weights '{weights}'; use model or int8")
    if weights == "int8" and exact_int8_head:
        raise TokensiftError("--exact-int8-head needs the fp32 output layer; --weights int8 already quantizes it")
    if weights == "int8" and speculate is not None:
        raise TokensiftError("--speculate is not lossless over --weights int8 (measured: 4 of 25 outputs equal its plain "
                             "decoding); use one or the other")
    text = read_prompt(prompt, prompt_file)
    model_obj, tokenizer = load_model(model, device=device, dtype=dtype)
    if weights == "int8":
        from tokensift.int8_linears import calibration_ids, quantize_linears

        quantize_linears(model_obj, calibration_ids(tokenizer, model_obj.device))
    if chat:
        text = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)
    stream, finish = (None, None) if as_json else text_printer(tokenizer)
    if speculate is not None:
        run_speculative(model_obj, tokenizer, text, speculate, tree_nodes, spec_state, chosen, as_json, stream,
                        spec_warm=spec_warm, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                        repetition_penalty=repetition_penalty, stop_strings=stop or (), seed=seed,
                        prefill_chunk=prefill_chunk, finish=finish, prefill=prefill_policy, exact_int8_head=exact_int8_head)
        return
    result = run_generate(
        model_obj, tokenizer, text, policy=chosen, question=question, max_new_tokens=max_new_tokens,
        temperature=temperature, top_p=top_p, top_k=top_k, repetition_penalty=repetition_penalty,
        stop_strings=stop or (), seed=seed, prefill_chunk=prefill_chunk, on_token=stream, prefill=prefill_policy,
        exact_int8_head=exact_int8_head,
    )
    if as_json:
        print(json.dumps(result.as_dict()))
        return
    finish()
    console.print(
        f"[dim]{result.policy}: {result.prompt_tokens} prompt + {result.new_tokens} new tokens, "
        f"prefill {result.prefill} {result.prefill_seconds:.2f} s, KV {result.kv_bytes / 2**20:.1f} MiB of {result.kv_bytes_full / 2**20:.1f} MiB full, "
        f"{result.tokens_per_second:.1f} tok/s[/dim]"
    )


def run_speculative(model_obj, tokenizer, text, speculate, tree_nodes, spec_state, policy, as_json, stream,
                    finish=None, spec_warm=True, exact_int8_head=False, **options):
    """``generate --speculate``: lossless speculative decoding under any cache policy."""
    from tokensift.speculative import Speculator
    from tokensift.speculative.warm import load_state, save_state, warm_start

    speculator = Speculator(model_obj, speculate, fixed_nodes=tree_nodes, exact_int8_head=exact_int8_head)
    sequences = []
    if spec_state is not None and spec_state.exists():
        sequences = load_state(speculator, spec_state)
    elif spec_warm and tree_nodes != 0:
        sequences = warm_start(speculator, tokenizer, log=lambda message: print(message, file=sys.stderr))
    result = speculator.generate(tokenizer, text, policy=policy, on_token=stream, **options)
    if spec_state is not None:
        save_state(speculator, spec_state, sequences + [tokenizer(text)["input_ids"] + result.token_ids])
    if as_json:
        print(json.dumps(result.as_dict()))
        return
    if finish is not None:
        finish()
    console.print(
        f"[dim]{result.drafter} on {result.policy}: {result.prompt_tokens} prompt + {result.new_tokens} new tokens in "
        f"{result.steps} steps ({result.accepted_per_step:.2f} tokens/step, {result.mean_tree_nodes:.1f} draft nodes/step), "
        f"{result.tokens_per_second:.1f} tok/s[/dim]"
    )


@app.command()
def demo(
    budget: int = typer.Option(512, "--budget"),
    length: int = typer.Option(4096, "--length", help="Context length in tokens."),
    samples: int = typer.Option(3, "--samples", help="Needle prompts (different depths)."),
    device: str = typer.Option("cpu", "--device", help=DEVICE_HELP),
    dtype: str = typer.Option("float32", "--dtype", help=DTYPE_HELP),
) -> None:
    """Needle in a haystack at ~4k tokens: full cache vs policies at a budget, query-agnostic."""
    from tokensift.demo import run_demo

    run_demo(budget=budget, length=length, samples=samples, device=device, dtype=dtype)


@app.command()
def bench(
    ctx: typer.Context,
    suite: str = typer.Option("quick", "--suite", help=" | ".join(REGISTRY) + " (an option the suite does not take is an error)."),
    model: Optional[str] = typer.Option(None, "--model", help="smollm2 (default), gemma3, a .gguf or a folder (the long suite: gemma3)."),
    policies: Optional[str] = typer.Option(None, "--policies", help="Comma-separated policy names/expressions."),
    budgets: Optional[str] = typer.Option(None, "--budgets", help="Comma-separated token budgets."),
    ratios: Optional[str] = typer.Option(None, "--ratios", help="Comma-separated kept fractions."),
    lengths: Optional[str] = typer.Option(None, "--lengths", help="Comma-separated context lengths."),
    tasks: Optional[str] = typer.Option(None, "--tasks", help="Comma-separated task names."),
    protocols: Optional[str] = typer.Option(None, "--protocols", help="query_agnostic,query_aware"),
    samples: Optional[int] = typer.Option(None, "--samples", help="Instances per task and length."),
    seed: int = typer.Option(0, "--seed"),
    out: Path = typer.Option(Path("runs/bench"), "--out", help="Output folder (rerun to resume)."),
    full_only_tasks: Optional[str] = typer.Option(None, "--full-only-tasks", help="Retrieval tasks run with the full cache only."),
    lm_budgets: Optional[str] = typer.Option(None, "--lm-budgets", help="Budgets for ppl and fidelity (default: --budgets)."),
    workers: int = typer.Option(1, "--workers", help="Processes sharing the cores (each loads the model)."),
    ray: Optional[str] = typer.Option(None, "--ray", help="Run the jobs on a Ray cluster: --ray alone starts a local "
                                      "one; --ray auto or --ray HOST:PORT joins a running one (--workers: Ray workers)."),
    kernels: str = typer.Option("packed", "--kernels", help="packed (prepacked oneDNN linears) | stock (PyTorch's default)."),
    device: str = typer.Option("cpu", "--device", help=DEVICE_HELP),
    dtype: str = typer.Option("float32", "--dtype", help=DTYPE_HELP),
) -> None:
    """Run a benchmark suite; writes results.jsonl, report.md and plots into --out."""
    from tokensift.bench.suite import BENCH_OPTIONS, run_suite
    from tokensift.devices import resolve_device, resolve_dtype

    resolve_device(device), resolve_dtype(dtype)  # one-line errors before anything runs
    values = {"model": model, "policies": policies, "budgets": budgets, "ratios": ratios, "lengths": lengths,
              "tasks": tasks, "protocols": protocols, "samples": samples, "seed": seed, "full_only_tasks": full_only_tasks,
              "lm_budgets": lm_budgets, "workers": workers, "ray": ray, "kernels": kernels}
    given = [name for name in BENCH_OPTIONS if given_on_command_line(ctx, name)]
    run_suite(suite, out, values, given, device=device, dtype=dtype)


def given_on_command_line(ctx, name: str) -> bool:
    """Whether the option ``name`` was named on the command line (or in the environment), not defaulted."""
    source = ctx.get_parameter_source(name)
    return source is not None and source.name not in ("DEFAULT", "DEFAULT_MAP")


compare_app = typer.Typer(no_args_is_help=True, help="Run another library on the same tasks, side by side.")
app.add_typer(compare_app, name="compare")


@compare_app.command("kvpress")
def compare_kvpress_command(
    out: Path = typer.Option(Path("runs/bench"), "--out", help="Benchmark folder to merge rows into."),
    tasks: str = typer.Option("niah,niah_multikey,niah_multivalue,niah_multiquery,vt,cwe", "--tasks"),
    length: int = typer.Option(4096, "--length"),
    samples: int = typer.Option(10, "--samples"),
    seed: int = typer.Option(0, "--seed"),
    budgets: str = typer.Option("128,256,512", "--budgets", help="tokensift budgets; run as keep ratio budget/context."),
    presses: Optional[str] = typer.Option(None, "--presses", help="Comma-separated kvpress presses (default: all supported)."),
    threads: int = typer.Option(2, "--threads", help="Torch threads of the kvpress worker."),
    model: Optional[str] = typer.Option(None, "--model", help="smollm2 (default), gemma3 or a .gguf file."),
    device: str = typer.Option("cpu", "--device", help=DEVICE_HELP),
    dtype: str = typer.Option("float32", "--dtype", help=DTYPE_HELP),
) -> None:
    """NVIDIA kvpress (own virtualenv) on the same instances; rows merged with library=kvpress."""
    from tokensift.bench.compare import compare_kvpress
    from tokensift.bench.kvpress_compare import PRESSES

    compare_kvpress(out, split_list(tasks), length, samples, seed, split_list(budgets, int),
                    split_list(presses) or list(PRESSES), threads=threads, model=model, device=device, dtype=dtype)


def register_optional_commands() -> None:
    """Commands that live with their feature (vision, bench), when present."""
    from tokensift.serve.command import register as register_serve

    register_serve(app)
    try:
        from tokensift.vision.cli import register as register_vision
    except ImportError:
        return
    register_vision(app)


# options whose value may be left out: ``--ray`` alone means ``--ray local``
OPTIONAL_VALUES = {"--ray": "local"}


def fill_optional_values(args: list[str]) -> list[str]:
    """``args`` with the implied value after an option of OPTIONAL_VALUES given without one."""
    out = []
    for index, arg in enumerate(args):
        out.append(arg)
        following = args[index + 1] if index + 1 < len(args) else None
        if arg in OPTIONAL_VALUES and (following is None or following.startswith("-")):
            out.append(OPTIONAL_VALUES[arg])
    return out


def main() -> None:
    """Entry point: user errors become one line on stderr and exit status 2."""
    register_optional_commands()
    sys.argv[1:] = fill_optional_values(sys.argv[1:])
    try:
        code = app(standalone_mode=False)  # a command's typer.Exit(n) comes back as n here
        if isinstance(code, int) and code:
            sys.exit(code)
    except TokensiftError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except (OSError, UnicodeDecodeError) as error:  # unreadable/unwritable files and folders given by the user
        print(f"error: {' '.join(str(error).split())}", file=sys.stderr)
        sys.exit(2)
    except typer.Exit as done:
        sys.exit(done.exit_code)
    except Exception as error:  # usage errors from typer's (vendored) click
        if hasattr(error, "format_message") and hasattr(error, "exit_code"):
            print(f"error: {error.format_message()}", file=sys.stderr)
            sys.exit(2)
        if type(error).__name__ == "Abort":
            sys.exit(130)
        raise


if __name__ == "__main__":
    main()
