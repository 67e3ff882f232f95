"""Supervision of `streamtune up`'s components: each runs in a thread and is restarted if it dies.

A component is a callable ``run(stop)`` that returns once ``stop`` is set and raises when it fails.
One that raises (or returns while nothing asked it to stop) is restarted after an exponential
backoff and the restart is reported (``on_restart``: a metric). A component that dies more than
``max_restarts`` times within ``window_s`` is broken, not unlucky: the supervisor records the
failure, naming the component and its error, and sets ``stop`` so the whole service ends non-zero
instead of running on without ingest or rollouts.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable

from services.config import SupervisorConfig
from services.errors import ServiceError

log = logging.getLogger(__name__)

Run = Callable[[threading.Event], None]


class ComponentExited(ServiceError):
    """A component returned although nothing asked it to stop."""


class ComponentFailed(ServiceError):
    """A component died more often than the supervisor allows; the service must stop."""

    def __init__(self, component: str, error: BaseException, restarts: int) -> None:
        super().__init__(
            f"component {component!r} failed {restarts + 1} times within the restart window; "
            f"last error: {type(error).__name__}: {error}"
        )
        self.component, self.error, self.restarts = component, error, restarts


class Supervisor:
    """Runs components in daemon threads; ``stop`` ends them all (and is set on exhaustion)."""

    def __init__(
        self,
        cfg: SupervisorConfig,
        stop: threading.Event | None = None,
        on_restart: Callable[[str, BaseException], None] | None = None,
    ) -> None:
        self.cfg = cfg
        self.stop = stop if stop is not None else threading.Event()
        self.on_restart = on_restart
        self.restarts: dict[str, int] = {}
        self.errors: dict[str, list[str]] = {}
        self.failure: ComponentFailed | None = None
        self.threads: dict[str, threading.Thread] = {}
        self._lock = threading.Lock()

    def add(self, name: str, run: Run) -> None:
        """Start supervising ``run`` under ``name`` now."""
        if name in self.threads:
            raise ServiceError(f"component {name!r} is supervised already")
        self.restarts[name] = 0
        self.errors[name] = []
        t = threading.Thread(target=self._supervise, args=(name, run), name=name, daemon=True)
        self.threads[name] = t
        t.start()

    def _supervise(self, name: str, run: Run) -> None:
        recent: deque[float] = deque()
        while not self.stop.is_set():
            try:
                run(self.stop)
                if self.stop.is_set():
                    return
                err: BaseException = ComponentExited(f"{name} returned without being stopped")
            except Exception as e:
                if (
                    self.stop.is_set()
                ):  # errors while stopping (Ray shut down under it) are expected
                    log.debug("%s ended with %r while stopping", name, e)
                    return
                err = e
            log.error("component %s died: %s: %s", name, type(err).__name__, err, exc_info=err)
            self.errors[name].append(f"{type(err).__name__}: {err}")
            now = time.monotonic()
            while recent and now - recent[0] > self.cfg.window_s:
                recent.popleft()
            if len(recent) >= self.cfg.max_restarts:
                with self._lock:
                    if self.failure is None:
                        self.failure = ComponentFailed(name, err, len(recent))
                log.error("giving up on %s: %s", name, self.failure)
                self.stop.set()
                return
            recent.append(now)
            delay = min(self.cfg.backoff_max_s, self.cfg.backoff_s * 2 ** (len(recent) - 1))
            if self.stop.wait(delay):
                return
            self.restarts[name] += 1
            log.warning("restarting %s (restart %d)", name, self.restarts[name])
            if self.on_restart is not None:
                try:
                    self.on_restart(name, err)
                except Exception as e:  # reporting must never stop supervision
                    log.warning("counting %s's restart failed (%s: %s); the dashboards miss it",
                                name, type(e).__name__, e)  # fmt: skip

    def join(self, timeout: float) -> list[str]:
        """Wait up to ``timeout`` s in all for the threads to end; returns those still running."""
        deadline = time.monotonic() + timeout
        for t in self.threads.values():
            t.join(max(0.0, deadline - time.monotonic()))
        return [n for n, t in self.threads.items() if t.is_alive()]
