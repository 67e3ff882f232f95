"""Signals as a request to stop: SIGINT and SIGTERM set an event the main thread waits on, so the
stop itself runs in order on that thread (``services.stopping.shutdown``)."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from types import FrameType


@contextlib.contextmanager
def stop_on_signals(stop: threading.Event) -> Iterator[list[int]]:
    """SIGINT/SIGTERM set ``stop`` (the main thread then shuts down); yields the signals seen."""
    seen: list[int] = []

    def handler(signum: int, frame: FrameType | None) -> None:
        seen.append(signum)
        stop.set()

    old = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield seen
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)


def reinstall(stop: threading.Event, seen: list[int]) -> None:
    """Ray's ``init`` installs its own SIGTERM handler in the driver; put ours back."""

    def handler(signum: int, frame: FrameType | None) -> None:
        seen.append(signum)
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, handler)
