"""The live replay of `streamtune demo`, and what it notes for the report.

A backlog is published first and the loop's first version trains on it; then the rest of the
stream is replayed at a steady rate while a client keeps querying the live endpoint, until the loop
has trained and served the end of it. Along the way: when each event was published (``Clock``),
which versions answered live and when (``Queries``), and the champion at each slice's start
(``StreamWatch``).
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import httpx
from rich.console import Console

from services.errors import ServiceError
from streams.events import Event
from streams.progress import working

if TYPE_CHECKING:
    from services.demo import DemoConfig
    from services.demo_live import DemoClicks
    from services.loop import ContinualLoop
    from services.running import Running
    from training.registry import LoadedVersion, Registry

console = Console()
log = logging.getLogger(__name__)

# Bounds on the demo's own waits: a backlog that never reaches the buffer is a fault, a tail the
# loop does not train in time is reported as pending.
_BACKLOG_S = 300.0
_TAIL_S = 120.0


@dataclass
class Clock:
    """Wall time at which each replayed event was handed to the producer, numbered in order
    across ``stamp`` calls."""

    times: list[float] = field(default_factory=list)

    def stamp(self, events: Iterable[Event]) -> Iterator[Event]:
        for event in events:
            self.times.append(time.time())
            yield event

    def published(self, n: int) -> float:
        """When event number ``n`` (0-based) was published (now, if it has not been yet)."""
        return self.times[n] if n < len(self.times) else time.time()


class Queries:
    """A client hitting /recommend, counting statuses, versions seen and interleaved answers.

    Without ``clicks`` it asks for random users; with them, the user whose event ``published()``
    says comes next asks, and clicks on the answer as the click model says (``DemoClicks``).
    """

    def __init__(
        self,
        url: str,
        users: list[str],
        rps: float,
        clicks: DemoClicks | None = None,
        published: Callable[[], int] | None = None,
    ) -> None:
        self.url, self.users, self.rps = url, users, rps
        self.clicks, self._published = clicks, published or (lambda: 0)
        self.ok = self.failed = 0
        self.interleaved = 0  # answers that interleaved a live trial's two versions
        self.click_errors = 0
        self.first_seen: dict[int, float] = {}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="queries", daemon=True)

    def _run(self) -> None:
        rng = random.Random(0)
        try:
            with httpx.Client(timeout=10) as client:
                while not self.stop.wait(1.0 / self.rps):
                    self._one(client, rng)
        finally:
            if self.clicks is not None:
                self._send_clicks(flush_all=True)
                self.clicks.close()

    def _one(self, client: httpx.Client, rng: random.Random) -> None:
        published = self._published()
        user = self.clicks.asker(published) if self.clicks else rng.choice(self.users)
        try:
            r = client.post(f"{self.url}/recommend", json={"user_id": user, "k": 10})
            ok = r.status_code == 200
        except httpx.HTTPError:
            ok = False
        if not self.first_seen and not ok:
            return  # nothing is deployed before the first version: not a failure
        if not ok:
            self.failed += 1
            return
        self.ok += 1
        answer = r.json()
        self.first_seen.setdefault(int(answer["version"]), time.time())
        self.interleaved += answer.get("trial") is not None
        if self.clicks is not None:
            self.clicks.answered(user, [it["item_id"] for it in answer["items"]], published)
            self._send_clicks()

    def _send_clicks(self, flush_all: bool = False) -> None:
        assert self.clicks is not None
        try:
            self.clicks.send_due(flush_all)
        except Exception as err:  # the broker stopping under the demo; the clicks are lost
            self.click_errors += 1
            if self.click_errors == 1:
                log.warning("sending the simulated clicks failed: %s", err)


class StreamWatch:
    """What the demo notes while the stream runs: the champion at each slice's start (snapshot
    in the producer's thread, before the slice's first event is sent), those versions and the
    first promoted one loaded into memory (where the registry's pruning cannot take them)."""

    def __init__(self, registry: Registry, loop: ContinualLoop) -> None:
        self.registry, self.loop = registry, loop
        self.starts: dict[int, int | None] = {}
        self.models: dict[int, LoadedVersion | None] = {}
        self.static: LoadedVersion | None = None
        self.static_version: int | None = None
        self.bounds: list[tuple[int, int]] = []
        self.ended = 0.0  # when the last event was published
        self.said = 0  # round records printed so far
        self.trials: set[str] = set()  # live trials announced so far
        self.decided = 0  # decision log lines looked at so far
        self._lock = threading.Lock()

    def marked(self, events: Iterator[Event], first: int, stop: threading.Event) -> Iterator[Event]:
        starts = {a for a, _ in self.bounds}
        for n, event in enumerate(events, start=first):
            if stop.is_set():
                return  # the producer ends with the demo
            if n in starts:
                champion = self.registry.champion()
                with self._lock:
                    self.starts[n] = champion
            yield event

    def poll(self) -> None:
        from services.demo_report import ledger_of

        with self._lock:
            wanted = {v for v in self.starts.values() if v is not None} - set(self.models)
        for v in sorted(wanted):
            self.models[v] = _load(self.registry, v)
        records = self.loop.state()["rounds"]
        champion = self.registry.champion()
        if self.static_version is None and champion is not None:
            v1 = self.static_version = min(ledger_of(records).promoted, default=champion)
            self.static = self.models[v1] if v1 in self.models else _load(self.registry, v1)
        for rec in records[self.said :]:
            decision = "promote" if rec.get("promoted") else "reject"
            console.print(
                f"v{rec.get('version')} ({rec.get('kind', 'incremental')} round): {decision} "
                f"after {rec.get('new_events', 0):,} new events ({rec.get('seconds', 0.0):.1f} s)"
                f" - {rec.get('reason', '')}"
            )
        self.said = len(records)
        self._say_live()

    def _say_live(self) -> None:
        """A live trial as it starts, and its decision as the controller makes it."""
        trial = self.registry.rollout_state().trial
        if trial is not None and trial.id not in self.trials:
            self.trials.add(trial.id)
            console.print(f"live trial {trial.id} ({trial.mode}): v{trial.a} (a) against "
                          f"v{trial.b} (b) on {trial.share:.0%} of the answers")  # fmt: skip
        log_ = self.registry.decision_log()
        for d in log_[self.decided :]:
            if d.decision.startswith("live-"):
                console.print(f"v{d.version} {d.decision}: {d.reason}")
        self.decided = len(log_)


def run_replay(
    running: Running,
    cfg: DemoConfig,
    events: list[Event],
    clock: Clock,
    queries: Queries,
    stop: threading.Event,
) -> StreamWatch | None:
    """The backlog, then `up`'s loop as `up` runs it, then the rest of the stream at its rate."""
    from services.demo_report import slice_bounds
    from streams.producer import replay

    s, first = running.settings, cfg.first_round_events
    with working(f"publishing a backlog of {first:,} events"):
        replay(_until(clock.stamp(events[:first]), stop), s.kafka, s.topics.events)
        waited = _wait_for(lambda: running.buffer.stats().rows >= first, _BACKLOG_S, stop)
        if waited == "timeout":
            got = running.buffer.stats().rows
            raise ServiceError(f"ingest buffered {got:,} of the {first:,} backlog events in "
                               f"{_BACKLOG_S:.0f} s")  # fmt: skip
        if waited == "stopped":
            return None
    running.supervisor.add("loop", running.loop.run)
    # The live stream starts once the first version answers, as for a service started on a
    # topic's history: the first round (many epochs over the backlog) is set-up, not freshness.
    with working(f"the loop's first version trains on the {first:,} backlog events"):

        def served() -> bool:
            loop, reg = running.loop, running.registry
            if loop.retry_at_pending is not None:  # too few to gate: it waits for more events
                return True
            if reg.champion() is None:  # a first version the gate rejected: the same
                return reg.latest() is not None and loop.pending() == 0
            return queries.rps == 0 or bool(queries.first_seen)

        if _wait_for(served, _BACKLOG_S * 3, stop) == "stopped":
            return None
    if running.registry.champion() is None:
        latest = running.registry.latest()
        why = running.registry.meta(latest).get("reason") if latest else running.loop.last_skip
        console.print(f"[yellow]no first version from the backlog ({why}); the loop tries again "
                      "on the live stream[/yellow]")  # fmt: skip
    watch = StreamWatch(running.registry, running.loop)
    watch.bounds = slice_bounds(first, len(events), cfg.slice_events)
    errors: list[BaseException] = []

    def produce() -> None:
        try:
            rest = watch.marked(clock.stamp(events[first:]), first, stop)
            replay(rest, s.kafka, s.topics.events, rate=cfg.rate)
        except Exception as err:  # reported by the demo's thread
            errors.append(err)

    producer = threading.Thread(target=produce, name="producer", daemon=True)
    producer.start()
    console.print(
        f"{first:,} events buffered; the loop is running. Replaying the other "
        f"{len(events) - first:,} at {cfg.rate:.0f}/s into {s.topics.events}; Serve at "
        f"http://{s.serving.host}:{s.serving.port}; dashboard at http://127.0.0.1:8265"
    )
    while producer.is_alive() and not stop.wait(0.5):
        watch.poll()
    watch.ended = time.time()
    if errors and not stop.is_set():
        raise ServiceError(f"replaying the stream failed: {errors[0]}") from errors[0]
    return None if stop.is_set() else watch


def _until(events: Iterator[Event], stop: threading.Event) -> Iterator[Event]:
    for event in events:
        if stop.is_set():
            return
        yield event


def _wait_for(
    cond: Callable[[], bool], timeout: float, stop: threading.Event
) -> Literal["done", "stopped", "timeout"]:
    deadline = time.monotonic() + timeout
    while not cond():
        if stop.wait(0.5):
            return "stopped"
        if time.monotonic() > deadline:
            return "timeout"
    return "done"


def wait_tail(
    running: Running, queries: Queries, watch: StreamWatch, total: int, stop: threading.Event
) -> bool:
    """Until the loop has trained the whole stream and the newest promoted version answered live
    (so every event trained on is attributed to a live version). False on ``stop``.

    A rejected last round's events wait in the carry until the stream has been quiet for
    ``loop.max_pending_s``; then the loop trains them alone (a few tries), and this waits for it.
    What the loop has not trained within the bound is reported as pending. So are the last few
    events when a round found too few of them to train on and the loop waits for more (e.g. the
    simulated users' last clicks, landing after the replay's last round).
    """
    loop, reg = running.loop, running.registry

    def idle() -> bool:
        watch.poll()
        champion = reg.champion()
        clicks = queries.clicks.sent if queries.clicks is not None else 0  # buffered as well
        return (
            running.buffer.stats().rows >= total + clicks
            and (loop.pending() == 0 or loop.retry_at_pending is not None)
            and not loop.carry_waiting()
            and champion is not None
            and (queries.rps == 0 or champion in queries.first_seen)
        )

    with working("waiting for the loop to train and serve the end of the stream"):
        waited = _wait_for(idle, _TAIL_S, stop)
    if waited == "timeout":
        console.print(f"the end of the stream was not trained and served in {_TAIL_S:.0f} s")
    return waited != "stopped"


def _load(registry: Registry, version: int) -> LoadedVersion | None:
    try:
        return registry.load(version)
    except LookupError as err:  # pruned already: that slice goes unscored
        log.warning("v%d could not be loaded for scoring: %s", version, err)
        return None
