"""``tokensift serve --replicas N``: N copies of the single server behind one endpoint (Ray Serve).

Each replica is a Ray actor that loads the model and runs the app of ``tokensift serve``
(:func:`tokensift.serve.app.create_app`: same routes, batching, queue and errors); Ray Serve's
proxy routes each request to the replica with fewer requests in flight. Metrics and ``/health``
are the answering replica's own; every response names its replica in ``x-tokensift-replica``.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading
import time

from tokensift.errors import TokensiftError

APP_NAME = "tokensift"
DELETE_TIMEOUT = 60.0  # seconds serve.delete gets at shutdown
SHUTDOWN_TIMEOUT = 150.0  # seconds the whole shutdown gets before the process ends itself
REPLICA_HEADER = "x-tokensift-replica"


class ReplicaTag:
    """ASGI middleware: adds the replica's name to every HTTP response's headers."""

    def __init__(self, app, replica: str):
        self.app, self.header = app, (REPLICA_HEADER.encode(), replica.encode())

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def tagged(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), self.header]}
            await send(message)

        await self.app(scope, receive, tagged)


class Replica:
    """One replica: the model and the single server's app, built inside the Ray actor."""

    def __init__(self, model_name, served_name: str, defaults, app_options: dict, load_options: dict):
        from tokensift.models import load_model
        from tokensift.serve.app import create_app

        model, tokenizer = load_model(model_name, **load_options)
        self.asgi = create_app(model, tokenizer, served_name, defaults, **app_options)
        self.asgi.add_middleware(ReplicaTag, replica=f"{socket.gethostname()}:{os.getpid()}")

    def __serve_build_asgi_app__(self):
        return self.asgi


def replica_app(model_name, served_name: str, defaults, *, replicas: int, replica_cpus: float, app_options: dict,
                load_options: dict):
    """The Ray Serve application: ``replicas`` copies of :class:`Replica`, ``replica_cpus`` each.

    A replica takes up to ``max_batch + max_queue + 1`` requests at once, so its own bounded
    queue (not Ray's) answers 429 past that.
    """
    from ray import serve

    ongoing = app_options.get("max_batch", 8) + app_options.get("max_queue", 128) + 1
    deployment = serve.deployment(serve.ingress()(Replica), name=APP_NAME, num_replicas=replicas,
                                  ray_actor_options={"num_cpus": replica_cpus}, max_ongoing_requests=ongoing)
    return deployment.bind(model_name, served_name, defaults, app_options, load_options)


def start_replicas(application, host: str, port: int) -> str:
    """Deploy on the connected cluster's Serve (started on ``host:port``); returns once every
    replica is up, with the endpoint's URL."""
    from ray import serve

    serve.start(http_options={"host": host, "port": port})
    try:
        serve.run(application, name=APP_NAME, route_prefix="/")
    except RuntimeError as error:
        detail = " ".join(str(error).split())[:300]
        raise TokensiftError(f"the replicas did not start: {detail}") from None
    return f"http://{host}:{port}"


def delete_app(serve, timeout: float = DELETE_TIMEOUT) -> bool:
    """``serve.delete`` of the app, bounded: a stuck Serve controller must not keep Ctrl-C from
    ending the server (the cluster's shutdown then stops the replicas). True if it finished."""
    worker = threading.Thread(target=serve.delete, args=(APP_NAME,), daemon=True)
    worker.start()
    worker.join(timeout)
    if worker.is_alive():
        print(f"tokensift: the replicas did not stop within {timeout:.0f} s; leaving them to Ray's shutdown",
              file=sys.stderr, flush=True)
        return False
    return True


def exit_watchdog(timeout: float = SHUTDOWN_TIMEOUT) -> threading.Timer:
    """End the process if the shutdown takes longer than ``timeout``: a stuck Ray disconnect or a
    library thread that never ends must not keep a stopped server alive (seen twice in tests)."""
    def force_exit():
        print(f"tokensift: shutdown took over {timeout:.0f} s; exiting", file=sys.stderr, flush=True)
        os._exit(0)

    timer = threading.Timer(timeout, force_exit)
    timer.daemon = True
    timer.start()
    return timer


def interrupt(signum, frame) -> None:
    """SIGTERM handler: stop like Ctrl-C."""
    raise KeyboardInterrupt


def run_replicas(model_name, host: str, port: int, defaults, *, replicas: int, address: str | None,
                 replica_cpus: float = 1.0, threads: int | None = None, served_name: str | None = None,
                 app_options: dict | None = None, load_options: dict | None = None) -> None:
    """Serve ``replicas`` copies of the model on Ray (``address`` None: a local Ray) until Ctrl-C."""
    from tokensift.ray_cluster import check_address, ray_cluster, require_ray

    if replicas < 1 or replica_cpus <= 0:
        raise TokensiftError(f"--replicas must be >= 1 and --replica-cpus > 0 (got {replicas}, {replica_cpus})")
    try:
        import tokensift.serve.app  # noqa: F401  (the replicas run this app)
    except ImportError as error:
        raise TokensiftError(f"tokensift serve needs the serve extra ({error.name} is missing): "
                             "pip install -r requirements-serve.txt") from None
    check_address(address or "local", "tokensift serve --replicas")  # before Ray's slow import
    require_ray("tokensift serve --replicas", serve=True)
    load = {"threads": threads or max(1, int(replica_cpus)), **(load_options or {})}
    application = replica_app(model_name, served_name or model_name or "smollm2", defaults, replicas=replicas,
                              replica_cpus=replica_cpus, app_options=app_options or {}, load_options=load)
    with ray_cluster(address or "local", "tokensift serve --replicas", serve=True):
        from ray import serve

        signal.signal(signal.SIGTERM, interrupt)  # a terminated server also takes its app off the cluster
        signal.signal(signal.SIGINT, interrupt)  # Ctrl-C stops it whatever handler Ray installed
        try:
            url = start_replicas(application, host, port)
            print(f"tokensift: {replicas} replica(s) of {served_name or model_name or 'smollm2'} serving at {url} "
                  "(Ctrl-C stops)", flush=True)
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
        finally:
            print("tokensift: stopping the replicas", file=sys.stderr, flush=True)
            exit_watchdog()
            delete_app(serve)
