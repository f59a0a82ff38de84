"""Ray (an optional extra): a one-line error without it, and a connection for a block of work."""

from __future__ import annotations

import socket
from contextlib import contextmanager

from tokensift.errors import TokensiftError

INSTALL = "pip install 'tokensift[ray]' (or pip install -r requirements-ray.txt)"


def require_ray(command: str, serve: bool = False):
    """The ``ray`` module, or a one-line error that says how to install it."""
    try:
        import ray

        if serve:
            from ray import serve as _  # noqa: F401  (ray[serve] brings its own dependencies)
    except ImportError as error:
        raise TokensiftError(f"{command} needs Ray ({error.name} is missing): {INSTALL}") from None
    return ray


def check_address(address: str, command: str) -> None:
    """A one-line error now for a ``HOST:PORT`` address that nothing answers on (Ray itself
    would keep retrying for minutes); ``local`` and ``auto`` pass."""
    if address in ("local", "auto"):
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise TokensiftError(f"{command}: a Ray address is local, auto or HOST:PORT (got '{address}')")
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as error:
        raise TokensiftError(f"{command}: no Ray cluster answers at {address} ({error.strerror or error})") from None


@contextmanager
def ray_cluster(address: str, command: str, serve: bool = False):
    """Ray connected for the block, then disconnected (``serve``: Ray Serve needed, its logs shown).

    An existing connection of this process is used as it is (and left open). Otherwise
    ``local`` starts a Ray instance on this machine (stopped after the block), ``auto`` finds a
    running one (``RAY_ADDRESS`` or the latest ``ray start``), and anything else is the
    address of a running cluster (``HOST:PORT`` or ``ray://HOST:PORT``).
    """
    ray = require_ray(command, serve)
    check_address(address, command)
    if ray.is_initialized():
        yield ray
        return
    options = {"include_dashboard": False} if address == "local" else {}
    try:
        ray.init(address=address, log_to_driver=serve, **options)  # serve: replicas' access logs here
    except (ConnectionError, ValueError, RuntimeError) as error:
        detail = " ".join(str(error).split())[:200]
        raise TokensiftError(f"cannot reach a Ray cluster at '{address}': {detail}") from None
    try:
        yield ray
    finally:
        ray.shutdown()
