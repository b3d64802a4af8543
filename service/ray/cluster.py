"""Starting the fleet from ``loraswap serve --ray``: a Ray cluster (joined or started on loopback), Serve's
HTTP proxy on the settings' host and port, the application, and a drain on SIGTERM/SIGINT.

A started cluster is local to this machine: node address 127.0.0.1 and no dashboard; Ray 2.60 turns
on its token authentication for a new local cluster unless ``RAY_AUTH_MODE`` says otherwise. Ray's own APIs
(GCS, raylet, dashboard, Jobs, client) run any code they are sent for anyone who reaches them
(ShadowRay, CVE-2023-48022): docs/deploy.md says how to keep them private. ``RAY_ADDRESS`` joins an
existing cluster instead.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
from typing import Any

from service.ray.app import APP_NAME, build_app
from service.ray.options import RayOptions

log = logging.getLogger(__name__)


def start_ray(num_cpus: int | None = None) -> None:
    """``ray.init``: join ``RAY_ADDRESS`` if set, else start a loopback-only local cluster."""
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=False)
        return
    ray.init(
        _node_ip_address="127.0.0.1",
        include_dashboard=False,
        num_cpus=num_cpus,
        log_to_driver=False,
    )


def free_port(host: str) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def local_cpus(options: RayOptions) -> int:
    """Enough logical CPUs for every replica at its ``replica_cpus`` (Ray counts them, it does not pin)."""
    most = options.autoscale[1] if options.autoscale else options.replicas
    return max(os.cpu_count() or 1, int(most * options.replica_cpus) + 1)


def deploy(options: RayOptions, host: str, port: int) -> str:
    """Serve's proxy on ``host:port`` and the app; returns its URL once every replica is ready."""
    from ray import serve

    serve.start(http_options={"host": host, "port": port})
    serve.run(build_app(options.to_args()), name=APP_NAME, route_prefix="/")
    return f"http://{host}:{port}"


def undeploy() -> None:
    """Delete the app (Serve drains in-flight requests first) and stop Serve."""
    from ray import serve

    serve.delete(APP_NAME)
    serve.shutdown()


def run(args: dict[str, Any]) -> int:
    """The ``--ray`` server: deploy, wait for SIGTERM/SIGINT, drain, exit 0."""
    import ray

    options = RayOptions.from_args(args)
    settings = options.settings()
    port = settings.port or free_port(settings.host)
    start_ray(None if os.environ.get("RAY_ADDRESS") else local_cpus(options))
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        url = deploy(options, settings.host, port)
        scale = f"{options.autoscale[0]}..{options.autoscale[1]}" if options.autoscale else options.replicas
        log.info("serving on %s (Ray Serve, %s replicas, %s routing)", url, scale, options.routing)
        print(f"loraswap (Ray Serve) serving on {url}", flush=True)
        stop.wait()
        log.info("draining: in-flight requests finish, then the replicas stop")
        undeploy()
    finally:
        ray.shutdown()
    return 0
