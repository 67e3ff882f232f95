"""``Running``: the handle on a started system (``services.runtime.start``), for its caller and
for ``services.stopping.shutdown``."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

from services.loop import ContinualLoop
from services.metrics import StreamMetrics
from services.settings import Settings
from services.supervisor import Supervisor
from serving.rollout import RolloutController
from streams.buffer import EventBuffer
from streams.ingest import Ingestor
from training.registry import Registry


@dataclass
class Running:
    settings: Settings
    buffer: EventBuffer
    registry: Registry
    ingestor: Ingestor
    loop: ContinualLoop
    controller: RolloutController | None
    context: Any
    supervisor: Supervisor
    metrics: StreamMetrics
    serving: bool = False
    control: Any = None  # the rollout actor's handle (rollout.in_cluster), which outlives `up`
    _stopped: bool = field(default=False, repr=False)

    @property
    def stop_event(self) -> threading.Event:
        return self.supervisor.stop

    @property
    def stopped(self) -> bool:
        """Whether ``stop`` ran (ingest flushed), so a shutdown need not stop it again."""
        return self._stopped

    def serve_forever(self) -> None:
        """Also supervise the continual loop and (with Serve) the rollout controller."""
        self.supervisor.add("loop", self.loop.run)
        if self.controller is not None:  # its own thread: rollouts never wait for a round
            self.supervisor.add("rollout", self.controller.run)

    def stop(self, timeout: float = 60.0) -> None:
        """Graceful: every component is told to stop; ingest flushes what it holds first."""
        # Set the event before reading ``ingestor``: a restarting ingest either is the one read
        # here or sees the event and never starts.
        self.supervisor.stop.set()
        if self.controller is not None:
            self.controller.nudge()  # it waits on its own wake-up, not on the stop event
        self.ingestor.stop()
        t = self.supervisor.threads.get("ingest")
        if t is not None:
            t.join(timeout)
        self._stopped = True
