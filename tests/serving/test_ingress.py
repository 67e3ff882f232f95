"""The ingress a local Ray gets: HAProxy by default, Serve's Python proxy when asked."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest

from serving.config import ServingConfig
from serving.ingress import (
    HAPROXY_ENV,
    NODE_PORTS,
    WORKER_NICENESS,
    choose_for_local_ray,
    ray_env,
)
from streams.broker import free_port
from training.registry import Registry

from .test_serving_live import ITEMS, add_version


def test_haproxy_puts_its_switches_in_and_leaves_the_rest_alone() -> None:
    env = {"PATH": "/bin", "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "30"}
    choose_for_local_ray(ServingConfig(), env)
    assert env["RAY_SERVE_ENABLE_HA_PROXY"] == "1"
    assert (
        env["RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"]
        == HAPROXY_ENV["RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"]
    )
    assert env["PATH"] == "/bin"
    # HAProxy's stats and metrics ports and the fallback proxy's: free ones, not Serve's fixed
    # defaults, so a second local Ray (or another node on this machine) does not collide
    ports = [int(env[k]) for k in NODE_PORTS]
    assert len(set(ports)) == len(NODE_PORTS) and not {8404, 9101, 8500, 9500} & set(ports)


def test_proxy_takes_the_switches_out_that_an_earlier_choice_left() -> None:
    env = {"PATH": "/bin"}
    choose_for_local_ray(ServingConfig(), env)
    choose_for_local_ray(ServingConfig(ingress="proxy"), env)
    assert env == {"PATH": "/bin", WORKER_NICENESS: "0"}
    assert ray_env(ServingConfig(ingress="proxy")) == {}


def test_a_local_rays_workers_start_at_the_configured_niceness() -> None:
    # Ray's own default (15) would put replicas and history shards level with training workers
    env: dict[str, str] = {}
    choose_for_local_ray(ServingConfig(), env)
    assert env[WORKER_NICENESS] == "0"
    choose_for_local_ray(ServingConfig(worker_niceness=5), env)
    assert env[WORKER_NICENESS] == "5"


def test_an_unknown_ingress_is_refused_at_the_boundary() -> None:
    with pytest.raises(ValueError, match="ingress"):
        ServingConfig(ingress="nginx")  # type: ignore[arg-type]


@pytest.fixture
def restore_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    import services.runtime

    saved = {
        k: os.environ.get(k) for k in [*HAPROXY_ENV, *NODE_PORTS, *services.runtime.LOCAL_RAY_ENV]
    }
    monkeypatch.setattr(services.runtime, "_started_local_ray", False)
    yield
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def test_every_local_ray_gets_the_ingress_and_the_local_settings(
    restore_env: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``init_ray`` and the benchmarks prepare a local Ray's environment in one place; a setting
    the user exported wins over the local default."""
    from services.runtime import LOCAL_RAY_ENV, local_ray_environ

    monkeypatch.setenv(WORKER_NICENESS, "7")  # restored after the test
    for key in LOCAL_RAY_ENV:
        monkeypatch.delenv(key, raising=False)
    local_ray_environ(ServingConfig())
    assert {k: os.environ[k] for k in LOCAL_RAY_ENV} == LOCAL_RAY_ENV
    assert os.environ["RAY_SERVE_ENABLE_HA_PROXY"] == "1" and os.environ[WORKER_NICENESS] == "0"
    monkeypatch.setenv("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "1")
    local_ray_environ(ServingConfig(ingress="proxy"))
    assert os.environ["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] == "1"
    assert "RAY_SERVE_ENABLE_HA_PROXY" not in os.environ


def _listener(port: int, wait_s: float = 10.0) -> str:
    """Name and command line of the process of this test's local Ray that listens on ``port``.

    Looked up system-wide by socket and then checked for descent, retried for a few seconds:
    HAProxy reloads its configuration by starting a new process that takes the socket over, and a
    walk of the process tree taken mid-reload can see the old one gone and the new one not yet.
    """
    deadline = time.monotonic() + wait_s
    while True:
        ours = {p.pid for p in psutil.Process().children(recursive=True)}
        for c in psutil.net_connections("tcp"):
            listens = c.laddr and c.laddr.port == port and c.status == psutil.CONN_LISTEN
            if listens and c.pid in ours:
                try:
                    p = psutil.Process(c.pid)
                    return " ".join([p.name(), *p.cmdline()[:1]])
                except psutil.NoSuchProcess:
                    pass  # it exited between the two reads; the next pass sees its successor
        if time.monotonic() > deadline:
            return "nobody"
        time.sleep(0.2)


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.parametrize("ingress", ["haproxy", "proxy"])
def test_a_local_ray_serves_through_the_chosen_ingress(
    ingress: str, tmp_path: Path, restore_env: None
) -> None:
    """`up` and `demo` start Ray through init_ray: the app's port is HAProxy's (the requests go
    from it straight to the replicas), or Serve's proxy actor's when asked."""
    import ray
    from ray import serve

    from services.runtime import init_ray
    from services.settings import Settings
    from serving.application import build_app

    cfg = ServingConfig(port=free_port(), replicas=1, ingress=ingress)  # type: ignore[arg-type]
    reg = Registry(tmp_path / "registry")
    v1 = add_version(reg, 1)
    init_ray(None, Settings(state_dir=tmp_path / "state", serving=cfg), dashboard=False)
    try:
        serve.start(http_options={"host": cfg.host, "port": cfg.port})
        serve.run(build_app(reg, cfg, v1), name=cfg.app_name, route_prefix="/")
        r = httpx.post(
            f"http://127.0.0.1:{cfg.port}/recommend",
            json={"history": ITEMS[:5], "k": 5}, timeout=30,
        )  # fmt: skip
        assert r.status_code == 200, r.text
        assert r.json()["version"] == v1 and len(r.json()["items"]) == 5
        listener = _listener(cfg.port)
        if ingress == "haproxy":
            assert listener.startswith("haproxy"), listener
        else:
            assert "ray::ProxyActor" in listener, listener
    finally:
        ray.shutdown()
