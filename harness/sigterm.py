"""SIGTERM as a clean exit for benchmarks that start Ray.

``ray.init`` connects a core worker that installs its own fatal-signal handler in the driver: a
SIGTERM then prints a stack and ends the process at once, so no ``finally`` runs and what the
benchmark started (its Kafka broker, Serve's HAProxy, spawned load processes) is left running
with no parent. Called after ``ray.init``, this puts a Python handler back that raises
``SystemExit``, so the benchmark's own clean-up runs as on Ctrl-C. (``streamtune up`` does the
same for its stop, ``services.signals.reinstall``.)
"""

from __future__ import annotations

import signal
import sys
import threading
from types import FrameType


def _exit(signum: int, frame: FrameType | None) -> None:
    sys.exit(128 + signum)


def exit_on_sigterm() -> None:
    """From now on SIGTERM raises ``SystemExit`` in the main thread (elsewhere: no change)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _exit)
