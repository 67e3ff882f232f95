"""The processes this one has started (Ray's raylet, its agents and workers), tracked while the
system runs so that a stop can end whatever outlives it."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import threading
import time
from typing import Any

log = logging.getLogger(__name__)

# Every process this one has started, as last seen (pid -> psutil.Process, which knows its start
# time, so a recycled pid is never mistaken for ours). Ctrl-C in a terminal signals the whole
# foreground group: Ray's raylet may exit before ``shutdown`` looks, and its agents, reparented,
# are no longer our children then; they are still in here.
_seen: dict[int, Any] = {}
_SEEN_EVERY_S = 2.0
_tracker: threading.Thread | None = None


def stop_group(proc: subprocess.Popen[bytes], grace_s: float = 15.0) -> None:
    """SIGTERM the process group ``proc`` leads, SIGKILL it after ``grace_s``; wait for it."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def track() -> None:
    """Keep ``descendants`` current from a background thread, from now on."""
    global _tracker
    if _tracker is None:  # one per process, however many local Rays it starts
        _tracker = threading.Thread(target=_track_descendants, name="track-descendants",
                                    daemon=True)  # fmt: skip
        _tracker.start()


def descendants() -> list[Any]:
    import psutil

    try:
        now = psutil.Process().children(recursive=True)
    except psutil.Error:
        now = []
    _seen.update((p.pid, p) for p in now)
    for pid, p in list(_seen.items()):  # a long `up` starts and ends many Ray workers
        if not p.is_running():
            _seen.pop(pid, None)  # (the tracking thread may have dropped it first)
    return list(_seen.values())


def _track_descendants() -> None:
    while True:
        descendants()
        time.sleep(_SEEN_EVERY_S)


def reap(procs: list[Any], deadline: float) -> list[str]:
    """Wait briefly (2 s at most) for processes we started to end, then kill the rest.

    Ray's dashboard and runtime-env agents notice their raylet is gone only on their next poll;
    a stop must not depend on that.
    """
    import psutil

    _, alive = psutil.wait_procs(procs, timeout=max(0.5, min(2.0, deadline - time.monotonic())))
    killed = []
    for p in alive:
        with contextlib.suppress(psutil.Error):
            killed.append(f"{p.pid} {p.name()}")
            p.kill()
    psutil.wait_procs(alive, timeout=2.0)
    if killed:
        log.warning("killed processes that outlived the stop: %s", ", ".join(killed))
    return []
