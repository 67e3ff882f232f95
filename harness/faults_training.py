"""Fault: a Ray Train worker of a training round is killed from outside (SIGKILL).

The round runs for real (``training.round.run_round``: Ray Train workers running DeepSpeed ZeRO-2
over gloo on CPU). A watcher thread waits until Ray Train has registered the round's first epoch
checkpoint (its controller's ``checkpoint_manager_snapshot.json`` names a latest checkpoint), waits
a seeded random moment more, and SIGKILLs one ``RayTrainWorker`` process of this process's own Ray
instance (found among this process's descendants, so other Ray instances on the machine are never
touched). Survival means all of:

- the fault happened: the killed process is gone;
- Ray Train restarted the worker group and the resumed attempt started at epoch > 0 (each report
  and each checkpoint's ``progress.json`` carry ``start_epoch``), i.e. it resumed from the
  checkpoint instead of starting over;
- exactly one version was registered.

``recover_s`` is the time from the kill to the resumed attempt's first checkpoint (or, if the
resumed attempt reported nothing before finishing, to the registration).
"""

from __future__ import annotations

import json
import os
import random
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import pyarrow as pa

from harness.rounds import small_round
from streams.datasets import DriftSpec, synthetic_drift
from streams.events import RowBatch
from training.registry import Registry
from training.round import run_round

WORKER_TITLE = "RayTrainWorker"
FAULT = "training worker killed"


def stream_table(events: int, seed: int = 0, start: int = 0, users: int = 60) -> pa.Table:
    """Events [start, start + events) of a small synthetic drifting stream, as buffer rows."""
    spec = DriftSpec(users=users, events=start + events, seed=seed, new_item_every=150,
                     drift_every=4000, items_per_topic=25, topics=6)  # fmt: skip
    rows = RowBatch()
    for n, e in enumerate(synthetic_drift(spec)):
        if n >= start:
            rows.append(e, "events", 0, n)
    return rows.to_table()


def train_worker_pids() -> list[int]:
    """PIDs of the Ray Train worker processes under this process (our own Ray instance only)."""
    pids = []
    for proc in psutil.Process(os.getpid()).children(recursive=True):
        try:
            title = " ".join(proc.cmdline())
            if WORKER_TITLE in title and proc.status() != psutil.STATUS_ZOMBIE:
                pids.append(proc.pid)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return sorted(pids)


def checkpoint_registered(storage: Path) -> bool:
    """Whether Ray Train's controller has registered a checkpoint of a run under ``storage``."""
    for f in storage.glob("*/checkpoint_manager_snapshot.json"):
        try:
            if json.loads(f.read_text()).get("latest_checkpoint_result") is not None:
                return True
        except (OSError, ValueError):
            continue  # being written: not atomic
    return False


def progress_files(storage: Path) -> list[dict[str, Any]]:
    """Every checkpoint's progress.json under a Ray Train storage path (as persisted)."""
    out = []
    for f in storage.glob("*/checkpoint_*/progress.json"):
        try:
            out.append(json.loads(f.read_text()))
        except (OSError, ValueError):
            continue  # being written or already pruned (num_to_keep)
    return out


@dataclass
class WorkerKiller:
    """Kills one Ray Train worker once Ray Train has registered the round's first checkpoint."""

    storage: Path
    seed: int = 0
    # A random moment after the registered checkpoint, with epochs of the round still to train:
    # the controller registers a checkpoint at its next poll (trainer.poll_s, 0.5 s), and a
    # kill after the last epoch proves no resume (the restart trains nothing).
    delay_s: tuple[float, float] = (0.1, 1.0)
    timeout_s: float = 480.0
    killed_pid: int | None = None
    killed_at: float | None = None
    killed_gone: bool = False
    resumed_at: float | None = None
    resumed_start_epoch: int | None = None
    error: str | None = None
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> WorkerKiller:
        self._thread = threading.Thread(target=self._run, name="worker-killer", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _run(self) -> None:
        try:
            self._kill_after_first_checkpoint()
            self._watch_resume()
        except Exception as err:  # reported in the row, never swallowed silently
            self.error = f"{type(err).__name__}: {err}"

    def _kill_after_first_checkpoint(self) -> None:
        deadline = time.monotonic() + self.timeout_s
        while not checkpoint_registered(self.storage):
            if self._stop.wait(0.2) or time.monotonic() > deadline:
                self.error = "Ray Train registered no checkpoint: nothing to resume from"
                return
        rng = random.Random(self.seed)
        time.sleep(rng.uniform(*self.delay_s))
        pids = train_worker_pids()
        if not pids:
            self.error = f"no {WORKER_TITLE} process found among this process's descendants"
            return
        pid = rng.choice(pids)
        os.kill(pid, signal.SIGKILL)
        self.killed_pid, self.killed_at = pid, time.monotonic()
        while time.monotonic() < deadline:
            if not psutil.pid_exists(pid) or _is_zombie(pid):
                self.killed_gone = True
                return
            time.sleep(0.1)

    def _watch_resume(self) -> None:
        while self.killed_at is not None and not self._stop.is_set():
            resumed = [p for p in progress_files(self.storage) if p.get("start_epoch", 0) > 0]
            if resumed:
                self.resumed_at = time.monotonic()
                self.resumed_start_epoch = int(resumed[0]["start_epoch"])
                return
            self._stop.wait(0.2)


def _is_zombie(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def fault_worker_kill(tmp: Path, quick: bool) -> dict[str, Any]:
    """One round with a worker SIGKILLed after its first checkpoint; the row for bench.faults."""
    import ray

    started_ray = not ray.is_initialized()
    if started_ray:
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        return _worker_kill_row(tmp, quick)
    finally:
        if started_ray:
            ray.shutdown()


def _worker_kill_row(tmp: Path, quick: bool) -> dict[str, Any]:
    reg = Registry(tmp / "registry")
    storage = tmp / "ray"
    table = stream_table(2500 if quick else 5000, seed=4)
    cfg = small_round(storage, epochs=10 if quick else 12, max_failures=2)  # ~0.5 s each
    killer = WorkerKiller(storage, seed=int(time.time()) if not quick else 0).start()
    error = None
    metrics: dict[str, float] = {}
    try:
        wm = {"events:0": int(max(table.column("offset").to_pylist())) + 1}
        result = run_round(table, table.slice(0, 0), wm, reg, cfg)
        metrics = result.metrics
    except Exception as err:
        error = f"{type(err).__name__}: {err}"
    finally:
        registered_at = time.monotonic()
        killer.stop()
    versions = reg.versions()
    start_epoch = int(metrics.get("train_start_epoch", 0))
    resumed = max(start_epoch, killer.resumed_start_epoch or 0)
    survived = (
        error is None
        and killer.error is None
        and killer.killed_gone
        and resumed > 0
        and len(versions) == 1
    )
    recover_s = None
    if killer.killed_at is not None:
        end = killer.resumed_at if killer.resumed_at is not None else registered_at
        recover_s = round(end - killer.killed_at, 1)
    detail = (
        f"killed pid {killer.killed_pid} ({'gone' if killer.killed_gone else 'NOT gone'}); "
        f"resumed attempt started at epoch {resumed} of {cfg.trainer.epochs}; "
        f"versions registered: {versions}"
        + (f"; round error: {error}" if error else "")
        + (f"; killer: {killer.error}" if killer.error else "")
    )
    return {
        "fault": FAULT,
        "survived": survived,
        "lost": 0 if versions else 1,  # the round's version, registered or not
        "duplicated": max(len(versions) - 1, 0),
        "failed_requests": None,  # no serving in this fault: not measured
        "recover_s": recover_s,
        "detail": detail,
        "killed_pid": killer.killed_pid,
        "resumed_start_epoch": resumed,
        "versions": versions,
    }
