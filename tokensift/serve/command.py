"""``tokensift serve``: load a model and run the OpenAI-compatible server with uvicorn."""

from __future__ import annotations

from typing import Optional

import typer

from tokensift.errors import TokensiftError


def serve(
    model: Optional[str] = typer.Option(None, "--model", help="smollm2 (default), gemma3, a .gguf, a folder or a hub id."),
    host: str = typer.Option("127.0.0.1", "--host"),
    port: int = typer.Option(8000, "--port"),
    policy: str = typer.Option("full", "--policy", help="Default policy of requests that name none."),
    budget: Optional[int] = typer.Option(None, "--budget", help="Default tokens kept per layer and KV head."),
    ratio: Optional[float] = typer.Option(None, "--ratio", help="Default fraction of tokens kept."),
    settings: Optional[list[str]] = typer.Option(None, "--set", help="Default policy parameter key=value (repeatable)."),
    speculate: Optional[str] = typer.Option(None, "--speculate", help="Default drafter: recycling | prompt_lookup | lookahead | auto."),
    max_tokens: int = typer.Option(64, "--max-tokens", help="max_tokens of requests that give none."),
    max_batch: int = typer.Option(8, "--max-batch", help="Sequences decoded together (running slots)."),
    max_queue: int = typer.Option(128, "--max-queue", help="Requests allowed to wait; past it: HTTP 429."),
    max_groups: int = typer.Option(2, "--max-groups", help="Batches (one per policy) decoding at once."),
    threads: Optional[int] = typer.Option(None, "--threads", help="Torch threads."),
    device: str = typer.Option("cpu", "--device", help="cpu (default), cuda, cuda:N, mps or auto."),
    dtype: str = typer.Option("float32", "--dtype", help="float32 (default, the exact reference), bfloat16 or float16."),
    kernels: str = typer.Option("packed", "--kernels", help="packed (prepacked oneDNN linears) | stock."),
    name: Optional[str] = typer.Option(None, "--served-name", help="Model name in /v1/models (default: --model or smollm2)."),
    replicas: Optional[int] = typer.Option(None, "--replicas", help="Model replicas behind one endpoint on Ray Serve (the ray extra)."),
    ray_address: Optional[str] = typer.Option(None, "--ray-address", help="Ray cluster of the replicas: HOST:PORT or auto (default: a local Ray)."),
    replica_cpus: float = typer.Option(1.0, "--replica-cpus", help="CPUs Ray reserves per replica (its torch threads unless --threads)."),
) -> None:
    """Serve a model over an OpenAI-compatible HTTP API, with a policy per request."""
    from tokensift.cli import parse_settings
    from tokensift.devices import resolve_device, resolve_dtype
    from tokensift.policies import build_policy
    from tokensift.serve.protocol import ApiError, ServerDefaults, speculate_choice

    if kernels not in ("packed", "stock"):
        raise TokensiftError(f"--kernels must be packed or stock (got '{kernels}')")
    if max_batch < 1 or max_queue < 0 or max_groups < 1:
        raise TokensiftError("--max-batch and --max-groups must be >= 1, --max-queue >= 0")
    resolve_device(device), resolve_dtype(dtype)  # one-line errors before the model loads
    params = parse_settings(settings)
    build_policy(policy, budget=budget, ratio=ratio, **params)  # fail now, not on the first request
    try:
        drafter = speculate_choice(speculate, None)
    except ApiError as error:
        raise TokensiftError(error.message) from None
    defaults = ServerDefaults(policy=policy, budget=budget, ratio=ratio, policy_params=params,
                              speculate=drafter, max_tokens=max_tokens)
    if replicas is not None or ray_address is not None:
        from tokensift.serve.replicas import run_replicas

        run_replicas(model, host, port, defaults, replicas=1 if replicas is None else replicas, address=ray_address,
                     replica_cpus=replica_cpus, threads=threads, served_name=name,
                     app_options={"max_batch": max_batch, "max_queue": max_queue, "packed": kernels == "packed",
                                  "max_groups": max_groups},
                     load_options={"device": device, "dtype": dtype})
        return
    run_server(model, host, port, defaults, max_batch=max_batch, max_queue=max_queue, threads=threads,
               packed=kernels == "packed", served_name=name, max_groups=max_groups, device=device, dtype=dtype)


def run_server(model_name, host, port, defaults, *, max_batch=8, max_queue=128, threads=None, packed=True,
               served_name=None, log_level="info", max_groups=2, device=None, dtype=None) -> None:
    """Load the model and block serving it."""
    try:
        import uvicorn

        from tokensift.serve.app import create_app
    except ImportError as error:
        raise TokensiftError(f"tokensift serve needs the serve extra ({error.name} is missing): "
                             "pip install -r requirements-serve.txt") from None
    from tokensift.models import load_model
    model, tokenizer = load_model(model_name, threads=threads, device=device, dtype=dtype)
    app = create_app(model, tokenizer, served_name or model_name or "smollm2", defaults,
                     max_batch=max_batch, max_queue=max_queue, packed=packed, max_groups=max_groups)
    uvicorn.run(app, host=host, port=port, log_level=log_level)


def register(app: typer.Typer) -> None:
    """Add ``serve`` to the CLI."""
    app.command("serve")(serve)
