"""When each timed probe click becomes readable from the events topic, clocked by a consumer in a
process of its own.

Why a process: a consumer thread inside the probe's process shares its interpreter lock with the
probe's HTTP loop. Each wake-up of either then waits for the other (up to the 5 ms switch
interval, several times per fetch), which inflates both clocks: the consumer's (the broker's share
of the path) and the probe's own (the system's latency). ``time.perf_counter`` is the system's
monotonic clock on Linux, so the child's readings compare with the probe's.
"""

from __future__ import annotations

import multiprocessing
import queue
import time
from multiprocessing.connection import Connection
from multiprocessing.synchronize import Event as StopEvent

from streams.config import KafkaConfig, TopicsConfig

TIMED = "-timed"  # the suffix of the event ids the clock notes


def timed_id(user: str) -> str:
    """The event id of ``user``'s timed click, the one the clock notes."""
    return f"{user}{TIMED}"


def _watch(kafka: KafkaConfig, topics: TopicsConfig, group: str, out: multiprocessing.Queue,
           ready: Connection, stop: StopEvent) -> None:  # fmt: skip
    from streams.tail import EventTail  # only the child needs the Kafka client

    tail = EventTail(kafka, topics, group, None)  # positioned at the end before "ready"
    ready.send(True)
    try:
        while not stop.is_set():
            for e in tail.poll(timeout_ms=100):
                if e.event_id.endswith(TIMED):
                    out.put((e.event_id, time.perf_counter()))
    finally:
        tail.close()


class ArrivalClock:
    """A child process that notes when each timed click (``timed_id``) becomes readable."""

    def __init__(self, kafka: KafkaConfig, topics: TopicsConfig, group: str) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._out: multiprocessing.Queue = ctx.Queue()
        self._stop = ctx.Event()
        self.seen: dict[str, float] = {}
        theirs, ours = ctx.Pipe(duplex=False)
        self._proc = ctx.Process(
            target=_watch, args=(kafka, topics, group, self._out, ours, self._stop), daemon=True
        )
        self._proc.start()
        if not theirs.poll(60):  # clicks sent before the consumer is positioned would be missed
            self.close()
            raise RuntimeError("the arrival clock's consumer did not start within 60 s")
        theirs.recv()

    def at(self, event_id: str, timeout: float = 1.0) -> float | None:
        """When ``event_id`` was seen; waits up to ``timeout`` s for it (None: not seen)."""
        deadline = time.perf_counter() + timeout
        while event_id not in self.seen:
            left = deadline - time.perf_counter()
            if left <= 0:
                break
            try:
                eid, t = self._out.get(timeout=left)
            except queue.Empty:
                break
            self.seen[eid] = t
        return self.seen.get(event_id)

    def close(self) -> None:
        self._stop.set()
        self._proc.join(timeout=10)
        if self._proc.is_alive():
            self._proc.kill()
