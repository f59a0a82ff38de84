"""Sparse-reading speed on this CPU: attention alone, and end-to-end decode at 8k.

``tokensift bench --suite sparse-speed --out DIR`` writes ``results.jsonl``, ``report.md``
and ``sparse_speed.png``:

(a) *kernel*: one decode step of one layer's attention, full SDPA (the faster of
    transformers' two GQA paths) vs each reading method's ``read`` at ``k = 256`` (selection
    included), on the embedded model's shapes (9 query heads, 3 KV heads, dim 64) and a wider
    synthetic config (32 / 8 / 128), at 8k, 16k and 32k cached tokens;
(b) *end-to-end* (1 thread by default: with 2 threads on the loaded shared machine a full
    decode step took ~2.8 s, almost all of it waiting): greedy decode tokens/s of the embedded model after an 8k prompt, each
    method vs ``full``, all from ONE full prefill (each method's cache is a shallow fork of
    the prefilled full cache: K/V tensors are shared, never written in place).

Timings: ``torch.set_num_threads(2)`` and again with 1 thread (on a shared, loaded 2-core
machine two OpenMP threads mostly wait on each other), medians of round-robin repeats, ratios
against the full baseline of the same run; the machine load (``os.getloadavg``) is recorded
next to each section.
"""

from __future__ import annotations

import pathlib
import platform
import statistics

import torch

from tokensift.bench.results import append_rows, read_rows, write_rows
from tokensift.bench.suite import Suite
from tokensift.bench.table import fmt, markdown_table
from tokensift.bench.timing import interleaved_medians, load_1min, load_averages, median_time
from tokensift.devices import clock, model_device, resolve_device, run_fields
from tokensift.policies import build_policy
from tokensift.selection import gather_attend, read_stats
from tokensift.storage.sparse_layer import sparse_layer_class
from tokensift.tokens import TokenStore

K = 256
METHODS = ("topk_attention", "tokenselect", "tidaldecode", "recycled_attention", "lessismore", "hisa")
SHAPES = {"smollm2-135m (9q/3kv/64)": (9, 3, 64), "wide synthetic (32q/8kv/128)": (32, 8, 128)}
CONTEXTS = (8192, 16384, 32768)
THREADS = (2, 1)
FULL_BUFFERED = "full (buffered append)"


# ----------------------------------------------------------------------- (a) kernel
def synthetic_layer(policy, keys: torch.Tensor, values: torch.Tensor, layer_idx: int = 5, num_layers: int = 30):
    """A reading layer holding ``keys``/``values`` (shared, nothing evicted), as after a prefill."""
    layer = sparse_layer_class(policy.layer_class)(layer_idx, num_layers, policy)
    batch, heads, length, _ = keys.shape
    positions = torch.arange(length, device=keys.device).expand(batch, heads, length)
    valid = torch.ones(batch, heads, length, dtype=torch.bool, device=keys.device)
    tokens = TokenStore({"keys": keys, "values": values, "positions": positions, "ranks": positions,
                         "valid": valid, "sink": positions < policy.n_sink})
    layer.adopt(tokens, torch.full((batch,), length, device=keys.device), length, compressed=False)
    layer.query_len = 1  # a decode step comes
    return layer


def random_kv(kv_heads: int, length: int, dim: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded random K/V (drawn on the host, the same on every device), placed on ``device``."""
    generator = torch.Generator().manual_seed(length + dim)
    return (torch.randn(1, kv_heads, length, dim, generator=generator).to(device),
            torch.randn(1, kv_heads, length, dim, generator=generator).to(device))


def full_sdpa(query, key, value, scaling):
    """Dense decode attention as the stock path runs it (best of enable_gqa and packed GQA)."""
    def gqa():
        return torch.nn.functional.scaled_dot_product_attention(query, key, value, scale=scaling, enable_gqa=True)

    def packed():
        batch, q_heads, _, dim = query.shape
        q = query.reshape(batch, key.shape[1], q_heads // key.shape[1], dim)
        return torch.nn.functional.scaled_dot_product_attention(q, key, value, scale=scaling)

    return gqa, packed


def kernel_rows(repeats: int, threads: int, device=None) -> list[dict]:
    device = resolve_device(device)
    rows = []
    for shape_name, (q_heads, kv_heads, dim) in SHAPES.items():
        for length in CONTEXTS:
            scaling = dim ** -0.5
            query = torch.randn(1, q_heads, 1, dim, generator=torch.Generator().manual_seed(1)).to(device)
            key, value = random_kv(kv_heads, length, dim, device)
            gqa, packed = full_sdpa(query, key, value, scaling)
            index = torch.sort(torch.randperm(length, generator=torch.Generator().manual_seed(2))[: K])[0]
            index = index.expand(1, kv_heads, K).contiguous().to(device)
            ok = torch.ones_like(index, dtype=torch.bool)
            cases = {"full: sdpa enable_gqa": gqa, "full: sdpa packed gqa": packed,
                     "gather k + sdpa (index given)": lambda: gather_attend(query, key, value, index, ok, scaling)}
            cases.update(method_cases(query, key, value, scaling))
            before = load_averages()
            medians = interleaved_medians(cases, repeats, device=device)
            full = min(medians["full: sdpa enable_gqa"], medians["full: sdpa packed gqa"])
            record = {"section": "kernel", "threads": threads, "shape": shape_name, "q_heads": q_heads,
                      "kv_heads": kv_heads, "dim": dim, "context": length, "k": K, "full_s": full, "load": before,
                      "device": str(device), "dtype": "float32"}
            rows.append({**record, "case": "full", "seconds": full, "speedup": 1.0})
            for name, seconds in medians.items():
                if not name.startswith("full"):
                    rows.append({**record, "case": name, "seconds": seconds, "speedup": full / seconds})
    return rows


def method_cases(query, key, value, scaling) -> dict:
    """Each method's per-layer read at one decode step, selection cost included."""
    def read_of(policy, layer_idx=5):
        layer = synthetic_layer(policy, key, value, layer_idx)
        return lambda: policy.read(layer, query, layer.keys, layer.values, None, scaling)

    cases = {
        "topk_attention (q·k scoring every step)": read_of(build_policy("topk_attention", k=K)),
        "tokenselect, fresh selection": read_of(build_policy("tokenselect", k=K, threshold=2.0)),
        "hisa (block filter + token top-k)": read_of(build_policy("hisa", k=K)),
    }
    # reuse steps: tokenselect cache hit, recycled between full steps, tidal/lessismore readers
    hit = build_policy("tokenselect", k=K, threshold=-1.0)
    layer = synthetic_layer(hit, key, value)
    hit.read(layer, query, layer.keys, layer.values, None, scaling)  # the selection it reuses
    cases["reuse step (tokenselect hit, recycled, tidal/lessismore readers)"] = (
        lambda: hit.read(layer, query, layer.keys, layer.values, None, scaling))
    tidal = build_policy("tidaldecode", k=K)
    selector = synthetic_layer(tidal, key, value, layer_idx=2)
    cases["tidaldecode selection layer (full attention + top-k)"] = (
        lambda: tidal.read(selector, query, selector.keys, selector.values, None, scaling))
    return cases


# ----------------------------------------------------------------- (b) end to end
def fork_cache(model, prefilled, policy):
    """A new cache for ``policy`` holding the prefilled full cache's tokens (tensors shared)."""
    from tokensift.cache import SelectingLayer
    from tokensift.engine import make_cache

    cache = make_cache(model, policy)
    for source, target in zip(prefilled.layers, cache.layers):
        if not isinstance(target, SelectingLayer):  # sliding-window layers (Gemma 3): append makes new tensors
            target.__dict__.update(source.__dict__)
            continue
        target.adopt(source.tokens().fork(), source.valid_seen, source.seen, compressed=source.compressed)
    return cache


def prompt_ids(tokenizer, length: int, device=None) -> torch.Tensor:
    try:
        from tokensift.data import essay_stream

        ids = list(essay_stream(tokenizer).ids)
        while len(ids) < length:
            ids = ids + ids
        ids = ids[:length]
    except Exception:  # essays unavailable: random ordinary tokens
        ids = torch.randint(100, 40000, (length,), generator=torch.Generator().manual_seed(0)).tolist()
    return torch.tensor([ids], dtype=torch.long, device=device)


_ORIGINAL_ATTENTION: list = [None]
ATTENTION_SECONDS: dict = {}  # layer type -> seconds inside the attention function (see timed_attention)


def timed_attention(module, *args, **kwargs):
    """The tokensift attention function, timed per layer type (sliding / full) into ATTENTION_SECONDS."""
    kind = "sliding" if kwargs.get("sliding_window") else "full"
    device = args[0].device  # the query
    start = clock(device)
    out = _ORIGINAL_ATTENTION[0](module, *args, **kwargs)
    ATTENTION_SECONDS[kind] = ATTENTION_SECONDS.get(kind, 0.0) + clock(device) - start
    return out


@torch.inference_mode()
def decode(model, cache, first: torch.Tensor, steps: int, shares: list | None = None) -> tuple[list[float], list[int]]:
    """Greedy decode ``steps`` tokens from ``first`` (the bench's one loop,
    :class:`~tokensift.bench.decode.GreedyDecoder`); per-step seconds and the tokens.

    ``shares`` (optional) gets, per step, the seconds spent in attention per layer type.
    """
    from tokensift.bench.decode import GreedyDecoder

    times: list[float] = []

    def step(seconds: float) -> None:
        times.append(seconds)
        if shares is not None:
            shares.append(dict(ATTENTION_SECONDS))
        ATTENTION_SECONDS.clear()

    ATTENTION_SECONDS.clear()
    tokens = GreedyDecoder(model, cache).run_from(first, steps, on_step=step)[0]
    return times, tokens


def end_to_end_rows(context: int, steps: int, rounds: int, threads: tuple[int, ...], model_name: str | None = None,
                    loaded=None, device=None, dtype=None) -> list[dict]:
    from transformers import AttentionInterface

    from tokensift import attention
    from tokensift.attention import NAME
    from tokensift.engine import make_cache
    from tokensift.models import load_model

    model, tokenizer = loaded or load_model(model_name, device=device, dtype=dtype)
    device = model_device(model)
    ids = prompt_ids(tokenizer, context, device)
    prefilled = make_cache(model, build_policy("full"))
    torch.set_num_threads(max(threads))
    start = clock(device)
    with torch.inference_mode():
        logits = model(input_ids=ids, past_key_values=prefilled, use_cache=True, logits_to_keep=1).logits
    prefill_s = clock(device) - start
    first = logits[:, -1].argmax(-1)
    policies = {"full": build_policy("full"),
                # the same stock dense attention, through a reading layer that never reads a subset
                FULL_BUFFERED: build_policy("topk_attention", k=1 << 30)}
    policies.update({name: build_policy(name, k=K) for name in METHODS})
    rows = []
    for count_threads in threads:
        torch.set_num_threads(count_threads)
        times: dict[str, list[float]] = {name: [] for name in policies}
        tokens: dict[str, list[int]] = {}
        stats: dict[str, dict] = {}
        loads = []
        shares: dict[str, list[dict]] = {name: [] for name in policies}
        _ORIGINAL_ATTENTION[0] = attention.tokensift_attention
        attention.tokensift_attention = timed_attention  # make_cache re-registers the module's function
        AttentionInterface.register(NAME, timed_attention)
        try:
            for _ in range(rounds):  # interleaved rounds: drift in machine load hits every method alike
                for name, policy in policies.items():
                    cache = fork_cache(model, prefilled, policy)
                    loads.append(load_1min(digits=None))
                    step_shares: list[dict] = []
                    step_times, out = decode(model, cache, first, steps, step_shares)
                    times[name].extend(step_times[1:])  # the first step pays one-off allocations
                    shares[name].extend(step_shares[1:])
                    tokens.setdefault(name, out)
                    stats[name] = read_stats(cache)
                    del cache
        finally:
            attention.tokensift_attention = _ORIGINAL_ATTENTION[0]
            AttentionInterface.register(NAME, _ORIGINAL_ATTENTION[0])
        full_step = statistics.median(times["full"])
        buffered_step = statistics.median(times[FULL_BUFFERED])
        for name in policies:
            step = statistics.median(times[name])
            agree = sum(a == b for a, b in zip(tokens[name], tokens["full"])) / len(tokens["full"])
            rows.append({
                "section": "end_to_end", "threads": count_threads, "policy": name,
                "k": None if name in ("full", FULL_BUFFERED) else K, "context": context,
                "prefill_tokens": ids.shape[1], "decode_steps": steps, "rounds": rounds, "median_step_s": step,
                "tokens_per_s": 1.0 / step, "speedup": full_step / step, "speedup_vs_full_buffered": buffered_step / step,
                "greedy_agreement_with_full": agree, "reads": stats[name], "prefill_s": prefill_s,
                "model": model_name or "smollm2", "attention_s_per_step": attention_split(shares[name]),
                "attention_share": sum(attention_split(shares[name]).values()) / step,
                "load_1min": [round(min(loads), 2), round(max(loads), 2)], **run_fields(model),
            })
        rows.append(breakdown_row(prefilled, context, count_threads, model.config.get_text_config().num_attention_heads))
    return rows


def attention_split(shares: list[dict]) -> dict:
    """Median seconds per decode step inside the attention function, per layer type."""
    kinds = sorted({kind for share in shares for kind in share})
    return {kind: statistics.median(share.get(kind, 0.0) for share in shares) for kind in kinds}


def breakdown_row(prefilled, context: int, threads: int, q_heads: int = 9) -> dict:
    """Per-token costs at this context over the model's full-attention layers: dense attention, K/V append."""
    layer = prefilled.selecting_layers[0]
    keys, values = layer.keys, layer.values
    query = torch.randn(1, q_heads, 1, keys.shape[-1], dtype=keys.dtype, device=keys.device)
    _, packed = full_sdpa(query, keys, values, keys.shape[-1] ** -0.5)
    new = keys[:, :, :1]
    attend = median_time(packed, 9, device=keys.device)
    append = median_time(lambda: (torch.cat([keys, new], 2), torch.cat([values, new], 2)), 9, device=keys.device)
    layers = len(prefilled.selecting_layers)
    return {"section": "breakdown", "threads": threads, "context": context, "layers": layers, "dense_attention_s_per_token": attend * layers,
            "kv_append_cat_s_per_token": append * layers, "load": load_averages()}


# ------------------------------------------------------------------------- report
def write_report(rows: list[dict], out_dir: pathlib.Path) -> None:
    lines = ["# Sparse reading: speed on this CPU", "",
             f"torch {torch.__version__}, {platform.machine()}, 2 cores shared with other jobs; medians of "
             "round-robin repeats; speedup = full time / method time in the same run. k = 256 tokens read per head.", ""]
    kernel = [r for r in rows if r["section"] == "kernel"]
    for threads in sorted({r["threads"] for r in kernel}, reverse=True):
        part = [r for r in kernel if r["threads"] == threads]
        body = [[r["shape"], r["context"], r["case"], fmt(r["seconds"] * 1e3, 3), fmt(r["speedup"], 2, "x")] for r in part]
        lines += [f"## (a) Attention alone, one layer, one decode step — {threads} thread(s)", "",
                  markdown_table(["shape", "context", "case", "ms", "speedup vs full SDPA"], body, align="lrlrr")]
        loads = sorted(r["load"][0] for r in part)
        lines += ["", f"1-min load average during this table: {loads[0]}–{loads[-1]} (2 cores).", ""]
    e2e = [r for r in rows if r["section"] == "end_to_end"]
    groups = sorted({(r["context"], r["threads"]) for r in e2e}, key=lambda g: (g[0], -g[1]))
    for context, threads in groups:
        part = [r for r in e2e if r["threads"] == threads and r["context"] == context]
        r0 = part[0]
        model = r0.get("model", "smollm2")
        lines += [f"## (b) End-to-end greedy decode, model `{model}`, {r0['prefill_tokens']}-token prompt — {threads} thread(s)", "",
                  f"One full prefill ({r0['prefill_s']:.0f} s), forked for every method; {r0['decode_steps']} steps x "
                  f"{r0['rounds']} interleaved rounds (first step of each dropped); 1-min load {r0['load_1min'][0]}–{r0['load_1min'][1]}.",
                  f"`{FULL_BUFFERED}` is stock dense attention through a reading layer that never reads a subset "
                  "(same append path as the sparse methods), so that column isolates the gain of reading a subset. "
                  "Attention ms/step: median time inside the attention function per decode step, full-attention "
                  "layers (where a policy reads a subset) / sliding-window layers; share = both / step time.", "",
                  markdown_table(END_TO_END_HEADER, [end_to_end_cells(r) for r in part], align="lrrrrrllr")]
        for r in rows:
            if r["section"] == "breakdown" and r["threads"] == threads and r["context"] == context:
                lines += ["", f"Per-token cost at {r['context']} tokens over {r['layers']} full-attention layers ({threads} thread(s)): dense "
                          f"attention {r['dense_attention_s_per_token'] * 1e3:.1f} ms; appending the new K/V the stock way "
                          f"(torch.cat of the whole layer cache) {r['kv_append_cat_s_per_token'] * 1e3:.1f} ms.", ""]
    (out_dir / "report.md").write_text("\n".join(lines) + "\n")


END_TO_END_HEADER = ["policy", "tokens/s", "ms/token", "speedup vs full", "vs full (buffered append)", "greedy agreement with full",
                     "sparse/dense layer-reads", "attention ms/step full / sliding", "attention share of step"]


def end_to_end_cells(r: dict) -> list:
    """One policy's row of the end-to-end table."""
    reads = r["reads"]
    detail = f"{reads.get('sparse', 0)}/{reads.get('dense', 0)}" if reads else "-"
    split = r.get("attention_s_per_step") or {}
    attention = f"{fmt(split.get('full', 0) * 1e3, 1)} / {fmt(split.get('sliding', 0) * 1e3, 1)}" if split else "-"
    share = f"{r['attention_share']:.0%}" if r.get("attention_share") is not None else "-"
    return [r["policy"], fmt(r["tokens_per_s"]), fmt(r["median_step_s"] * 1e3, 1), fmt(r["speedup"], 2, "x"),
            fmt(r["speedup_vs_full_buffered"], 2, "x"), fmt(r["greedy_agreement_with_full"]), detail, attention, share]


def plot(rows: list[dict], out_dir: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kernel = [r for r in rows if r["section"] == "kernel" and r["case"] != "full"]
    e2e = [r for r in rows if r["section"] == "end_to_end"]
    threads_k = min((r["threads"] for r in kernel), default=1)
    threads_e = min((r["threads"] for r in e2e), default=1)
    fig, axes = plt.subplots(1, 2 if e2e else 1, figsize=(14 if e2e else 7, 5), squeeze=False)
    ax = axes[0][0]
    cases = ("gather k + sdpa (index given)", "reuse step (tokenselect hit, recycled, tidal/lessismore readers)",
             "hisa (block filter + token top-k)", "tokenselect, fresh selection", "topk_attention (q·k scoring every step)")
    for shape in SHAPES:
        for index, case in enumerate(cases):
            pts = [(r["context"], r["speedup"]) for r in kernel
                   if r["shape"] == shape and r["case"] == case and r["threads"] == threads_k]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], "-" if shape.startswith("wide") else "--",
                        marker="o", color=f"C{index}", label=f"{case.split(' (')[0]} [{shape.split(' (')[0]}]")
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("cached tokens")
    ax.set_ylabel("speedup vs full SDPA (one layer, one step)")
    ax.set_title(f"(a) attention alone, k={K}, {threads_k} thread(s); solid: 32q/8kv/128, dashed: 9q/3kv/64", fontsize=9)
    ax.legend(fontsize=6)
    if e2e:
        ax = axes[0][1]
        part = [r for r in e2e if r["threads"] == threads_e and r["context"] == max(x["context"] for x in e2e)]
        ax.bar([r["policy"] for r in part], [r["tokens_per_s"] for r in part],
               color=["grey", "darkgrey"] + ["tab:blue"] * (len(part) - 2))
        ax.set_ylabel("decode tokens/s")
        ax.set_title(f"(b) {part[0].get('model', 'smollm2')} decode after {part[0]['prefill_tokens']} tokens, k={K}, {threads_e} thread(s)", fontsize=9)
        ax.tick_params(axis="x", rotation=30, labelsize=7)
    fig.tight_layout()
    fig.savefig(out_dir / "sparse_speed.png", dpi=110)
    plt.close(fig)


def run_sparse_speed(out_dir: pathlib.Path, *, kernel_repeats: int = 15, context: int = 8128, steps: int = 32,
                     rounds: int = 2, end_to_end: bool = True, threads: tuple[int, ...] = THREADS,
                     e2e_threads: tuple[int, ...] = (1,), model: str | None = None,
                     lengths: list[int] | None = None, kernel: bool | None = None, device: str | None = None,
                     dtype: str | None = None) -> None:
    """Run (a) and (b); write results.jsonl, report.md and sparse_speed.png into ``out_dir``.

    ``model`` (default: the embedded SmolLM2) and ``lengths`` (default: ``context``) choose the
    end-to-end runs; with another model the kernel section (synthetic shapes) is skipped unless
    ``kernel`` says otherwise.
    """
    from tokensift.devices import resolve_device, resolve_dtype
    from tokensift.models import load_model

    device, _ = resolve_device(device), resolve_dtype(dtype)  # one-line errors before any work
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    previous = torch.get_num_threads()
    rows: list[dict] = []
    kernel = (model in (None, "smollm2")) if kernel is None else kernel
    try:
        for count_threads in threads if kernel else ():
            torch.set_num_threads(count_threads)
            rows += kernel_rows(kernel_repeats, count_threads, device)
        if end_to_end:
            loaded = load_model(model, device=device, dtype=dtype)
            for length in lengths or [context]:
                rows += end_to_end_rows(length, steps, rounds, e2e_threads, model, loaded)
                append_rows(out_dir / "results.partial.jsonl", rows[-1:])  # progress survives a long run
    finally:
        torch.set_num_threads(previous)
    write_rows(out_dir / "results.jsonl", rows)
    report(out_dir)


def report(out_dir: pathlib.Path) -> None:
    """report.md and sparse_speed.png from ``out_dir/results.jsonl``."""
    out_dir = pathlib.Path(out_dir)
    rows = read_rows(out_dir / "results.jsonl")
    write_report(rows, out_dir)
    plot(rows, out_dir)


SUITE = Suite(names=("sparse-speed",), options=("model", "lengths"), runner=f"{__name__}:run_sparse_speed",
              reporter=f"{__name__}:report")


if __name__ == "__main__":
    import sys

    run_sparse_speed(pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else "runs/sparse_speed"),
                     end_to_end="--kernel-only" not in sys.argv)
