"""Closed-loop HTTP load from a process of its own, and CPU time per server process.

The load generator runs apart from the benchmark's process (which also publishes events and
drives rollouts) so its own CPU is counted apart and it shares no interpreter lock with them.
CPU is read from every process on the machine (``psutil``) before and after a load segment and
summed by role: the replicas of each app, HAProxy, Serve's controller, the history component, the
client, and the rest of Ray.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import random
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import aiohttp
import numpy as np
import psutil

# Server processes whose CPU a request costs (the goals' "sum over every server process").
SERVER_ROLES = ("replicas", "haproxy", "controller", "history")


def role_of(proc: psutil.Process, app: str, client_pid: int | None) -> str | None:
    """The role a process plays for ``app``'s requests, None for one unrelated to serving."""
    try:
        if proc.pid == client_pid:
            return "client"
        name = proc.name()
        cmd = " ".join(proc.cmdline())
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return None
    if name == "haproxy" or cmd.startswith("haproxy"):
        return "haproxy"
    if "ServeReplica:" in cmd:
        return "replicas" if f"ServeReplica:{app}:" in cmd else "other apps"
    if "ServeController" in cmd:
        return "controller"
    if "ServingContext" in cmd or "HistoryShard" in cmd:
        return "history"
    if "ray::" in cmd or "raylet" in cmd or "gcs_server" in cmd:
        return "ray other"
    return None


def cpu_by_pid() -> dict[int, tuple[psutil.Process, float]]:
    out = {}
    for p in psutil.process_iter():
        try:
            t = p.cpu_times()
            out[p.pid] = (p, t.user + t.system)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return out


def cpu_delta(
    before: dict[int, tuple[psutil.Process, float]], app: str, client_pid: int | None
) -> dict[str, float]:
    """CPU seconds per role since ``before`` (processes that came or went meanwhile: left out)."""
    out: dict[str, float] = {}
    for pid, (proc, now) in cpu_by_pid().items():
        if pid not in before:
            continue
        role = role_of(proc, app, client_pid)
        if role is not None:
            out[role] = out.get(role, 0.0) + now - before[pid][1]
    return out


async def _load(
    url: str, bodies: list[dict[str, Any]], concurrency: int, seconds: float
) -> dict[str, Any]:
    lat: list[float] = []
    errors = 0
    versions: set[int] = set()
    deadline = time.perf_counter() + seconds
    conn = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=conn) as session:

        async def client(i: int) -> None:
            nonlocal errors
            rng = random.Random(i)
            while time.perf_counter() < deadline:
                t0 = time.perf_counter()
                try:
                    async with session.post(url, json=rng.choice(bodies)) as r:
                        data = await r.json(content_type=None)
                        ok = r.status == 200
                except (aiohttp.ClientError, json.JSONDecodeError):
                    ok, data = False, None
                lat.append((time.perf_counter() - t0) * 1000)
                if not ok:
                    errors += 1
                elif isinstance(data, dict) and "version" in data:
                    versions.add(int(data["version"]))

        t0 = time.perf_counter()
        await asyncio.gather(*(client(i) for i in range(concurrency)))
        wall = time.perf_counter() - t0
    return {"lat": lat, "wall": wall, "errors": errors, "versions": sorted(versions)}


def load(
    url: str, bodies: list[dict[str, Any]], concurrency: int, seconds: float
) -> dict[str, Any]:
    """Closed loop: each of ``concurrency`` clients sends its next request when the previous
    answer arrives. Latencies (ms), wall time, non-2xx count, versions answered."""
    return asyncio.run(_load(url, bodies, concurrency, seconds))


class Loader:
    """``load`` in a spawned process of its own; ``measure`` adds CPU per role for ``app``."""

    def __init__(self) -> None:
        self._pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
        self.pid: int = self._pool.submit(_pid).result()

    def measure(
        self, url: str, app: str, bodies: list[dict[str, Any]], concurrency: int, seconds: float
    ) -> dict[str, Any]:
        before = cpu_by_pid()
        out = self._pool.submit(load, url, bodies, concurrency, seconds).result()
        out["cpu_s"] = cpu_delta(before, app, self.pid)
        return out

    def close(self) -> None:
        self._pool.shutdown()


def _pid() -> int:
    import os

    return os.getpid()


def merge(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """One level's figures from its alternating segments."""
    lat = np.asarray([x for p in parts for x in p["lat"]])
    n = len(lat)
    cpu: dict[str, float] = {}
    for p in parts:
        for role, s in p["cpu_s"].items():
            cpu[role] = cpu.get(role, 0.0) + s
    server_ms = sum(cpu.get(r, 0.0) for r in SERVER_ROLES) * 1000
    return {
        "p50_ms": float(np.percentile(lat, 50)) if n else None,
        "p99_ms": float(np.percentile(lat, 99)) if n else None,
        "rps": n / sum(p["wall"] for p in parts),
        "requests": n,
        "errors": sum(p["errors"] for p in parts),
        "versions": sorted({v for p in parts for v in p["versions"]}),
        "server_cpu_ms_per_req": server_ms / n if n else None,
        "client_cpu_ms_per_req": cpu.get("client", 0.0) * 1000 / n if n else None,
        "cpu_ms_per_req": {r: round(s * 1000 / n, 3) for r, s in sorted(cpu.items())} if n else {},
    }
