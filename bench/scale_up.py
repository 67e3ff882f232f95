"""``bench.scale``'s footprint part: ``streamtune up`` itself, holding a large population.

A state directory is prepared as ``up`` leaves it after rounds over ``users`` users and a catalog
of ``items`` items (the buffer written directly, a champion with its item map, item table, replay
reservoirs and per-user history index over all but the last ``tail`` events), then
``streamtune up`` runs on it with its defaults (embedded broker, local Ray, history shards, the
loop, Serve) plus ``serving.history_shards``. It rebuilds its shards, trains one round on the
``tail`` events and serves; the RSS of every process it started (the broker's JVM, Ray's own
processes, trainer workers, shards, replicas) is sampled every 0.5 s until a request for a user
from the population is answered from live history by a version newer than the prepared one.

Where this process may make memory cgroups (``harness.memcg``), ``up`` runs in one of its own,
capped at ``memory_limit`` bytes if given: the cgroup counts each page once (summed RSS counts a
shared library once per process mapping it), and a cap ``up`` does not fit under gets one of its
processes OOM-killed, which the row reports.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import psutil

from bench.scale_state import index_table, population, register_index, write_buffer
from harness.memcg import MemoryCgroup, available
from streams.buffer import EventBuffer
from streams.config import BufferConfig
from streams.offsets import tp_key
from training.registry import Registry

BUFFERED_TOPIC = "scale.buffered"


def prepare(state: Path, users: int, per_user: int, items: int, tail: int, seed: int) -> None:
    u, i = population(users, per_user, items, seed)
    write_buffer(EventBuffer(BufferConfig(path=state / "buffer")), u, i, topic=BUFFERED_TOPIC)
    cut = len(u) - tail
    register_index(Registry(state / "registry"), index_table(u[:cut], i[:cut]), items,
                   {tp_key(BUFFERED_TOPIC, 0): cut}, for_rounds=True)  # fmt: skip


def _role(p: psutil.Process) -> str:
    cmd = " ".join(p.cmdline())
    for key in ("java", "gcs_server", "raylet", "dashboard", "runtime_env", "log_monitor",
                "haproxy", "ServeReplica", "ServeController", "ProxyActor", "HistoryShard",
                "ServingContext", "RayTrainWorker", "TrainController", "_TrainingSession",
                "ray::IDLE", "streamtune"):  # fmt: skip
        if key in cmd:
            return key
    return p.name()


def _by_role(root: psutil.Process) -> dict[str, dict[str, float]]:
    """RSS and PSS (shared pages split between the processes mapping them) per kind of process:
    summed RSS counts a shared library once per process that maps it."""
    out: dict[str, dict[str, float]] = {}
    for p in [root, *root.children(recursive=True)]:
        try:
            mem = p.memory_full_info()
            r = out.setdefault(_role(p), {"n": 0, "rss": 0, "pss": 0})
            r["n"] += 1
            r["rss"] += mem.rss
            r["pss"] += getattr(mem, "pss", mem.rss)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return out


class Peaks:
    """Each process's largest RSS over the samples, by pid: where a peak of the whole comes
    from (a process the kernel killed for the cap keeps its last sample)."""

    def __init__(self) -> None:
        self.by_pid: dict[int, tuple[str, int]] = {}

    def sample(self, root: psutil.Process) -> int:
        """Sum of the tree's RSS now; every process's peak kept."""
        total = 0
        for p in [root, *root.children(recursive=True)]:
            try:
                rss = p.memory_info().rss
                role = _role(p)
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
            total += rss
            if rss > self.by_pid.get(p.pid, ("", 0))[1]:
                self.by_pid[p.pid] = (role, rss)
        return total

    def top(self, n: int = 6) -> list[dict[str, Any]]:
        ranked = sorted(self.by_pid.items(), key=lambda kv: -kv[1][1])[:n]
        return [{"pid": pid, "process": role, "peak_rss": rss} for pid, (role, rss) in ranked]


def _answered_live(port: int, user: str) -> int | None:
    """The version that answered ``user`` from live history, or None."""
    try:
        r = httpx.post(f"http://127.0.0.1:{port}/recommend", json={"user_id": user, "k": 10},
                       timeout=5)  # fmt: skip
    except httpx.HTTPError:
        return None
    if r.status_code != 200 or r.json().get("source") == "popularity":
        return None
    return int(r.json()["version"])


def up_row(users: int, per_user: int, items: int, tail: int, shards: int, seed: int,
           memory_limit: int | None = None,
           timeout_s: float = 1800.0) -> dict[str, Any]:  # fmt: skip
    from streams.broker import free_port

    tmp = Path(tempfile.mkdtemp(prefix=f"bench-scale-up-{users}-"))
    state = tmp / "state"
    t0 = time.monotonic()
    prepare(state, users, per_user, items, tail, seed)
    prepare_s = time.monotonic() - t0
    port = free_port()
    cfg = tmp / "streamtune.yaml"
    cfg.write_text(json.dumps({"state_dir": str(state),
                               "serving": {"port": port, "history_shards": shards}}))  # fmt: skip
    log = (tmp / "up.log").open("w")
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMTUNE_")}
    exe = str(Path(sys.executable).with_name("streamtune"))
    cg = MemoryCgroup("bench-scale-up", memory_limit) if available() else None
    proc = subprocess.Popen([exe, "-c", str(cfg), "up"],
                            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
                            preexec_fn=cg.enter if cg else None)  # fmt: skip
    root = psutil.Process(proc.pid)
    peak = steady = resident = 0
    peaks = Peaks()
    t1 = time.monotonic()
    live_at = version = None
    try:
        while time.monotonic() - t1 < timeout_s and proc.poll() is None:
            version = _answered_live(port, "0")
            if version is not None and version > 1:
                live_at = time.monotonic() - t1
                break
            for _ in range(4):  # a short peak (a rebuild, a round's start) is seen too
                peak = max(peak, peaks.sample(root))
                time.sleep(0.5)
        for _ in range(5):  # settled: what it holds while serving
            steady = max(steady, peaks.sample(root))
            resident = max(resident, cg.resident()) if cg else resident
            time.sleep(2.0)
        peak = max(peak, steady)
        roles = _by_role(root)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)
            try:
                proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        log.close()
        cgroup = _cgroup_figures(cg, resident)  # OOM kills until the stop included
        if cg is not None and not cg.remove():
            print(f"memory cgroup {cg.path} still has processes; left in place", file=sys.stderr)
    if live_at is None:
        raise RuntimeError(f"up never served a trained version live ({cgroup['cg_oom_kills']} "
                           f"OOM kills in its memory cgroup); see {tmp / 'up.log'}")  # fmt: skip
    if cgroup["cg_oom_kills"]:
        print(f"up's log, kept for its OOM kill: {tmp / 'up.log'}", file=sys.stderr)
    else:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"users": users, "items": items, "shards": shards, "prepare_s": prepare_s,
            "process_peaks": peaks.top(), "live_s": live_at, "version": version,
            "peak_rss": peak, "steady_rss": steady,
            "steady_pss": sum(r["pss"] for r in roles.values()), "roles": roles,
            **cgroup}  # fmt: skip


def _cgroup_figures(cg: MemoryCgroup | None, resident: int) -> dict[str, int | None]:
    """The cgroup's figures for the row; None each where no cgroup could be made."""
    if cg is None:
        return {"cg_limit": None, "cg_resident": None, "cg_peak": None, "cg_oom_kills": None}
    return {"cg_limit": cg.limit_bytes, "cg_resident": resident, "cg_peak": cg.peak(),
            "cg_oom_kills": cg.oom_kills()}  # fmt: skip
