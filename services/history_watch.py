"""Supervision of the serving context actor, a Ray actor rather than a thread of this process.

The history shards it starts are restarted by Ray itself (``max_restarts=-1``) and rebuild only
their users; the context's snapshot shows a shard that is not answering."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from typing import TYPE_CHECKING

from services.errors import ServiceError
from serving.context import start_context

if TYPE_CHECKING:
    from services.running import Running

log = logging.getLogger(__name__)

# A freshly created context's first answer waits for the shards' figures (bounded per shard), and
# the actor may first have to be scheduled on a busy head node.
_FIRST_PING_S = 180.0


class HistoryWatch:
    """The context actor (a Ray actor, not a thread) is alive iff it answers a ping in time."""

    def __init__(self, running: Running) -> None:
        self.running = running
        self.fresh = True  # the actor was just created: its first answer may take a while
        self.dead = False

    def run(self, stop: threading.Event) -> None:
        import ray
        from ray.exceptions import GetTimeoutError, RayActorError

        r, cfg = self.running, self.running.settings.supervisor
        if self.dead:
            self._recreate()
        while not stop.wait(0 if self.fresh else cfg.liveness_s):
            timeout = _FIRST_PING_S if self.fresh else cfg.liveness_timeout_s
            try:
                ray.get(r.context.snapshot.remote([]), timeout=timeout)
            except (RayActorError, GetTimeoutError) as err:
                self.dead = True
                raise ServiceError(f"serving context dead or unresponsive: {err}") from err
            self.fresh = False

    def _recreate(self) -> None:
        import ray

        from serving.context import find_context

        r, s = self.running, self.running.settings
        with contextlib.suppress(Exception):  # already dead is fine
            ray.kill(r.context, no_restart=True)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and find_context() is not None:
            time.sleep(0.2)  # the name is free once the old actor is gone
        r.context = start_context(s.kafka, s.topics, s.buffer, s.serving, r.registry)
        if r.controller is not None:
            r.controller.context = r.context
        self.dead, self.fresh = False, True
        log.warning("serving context recreated")
