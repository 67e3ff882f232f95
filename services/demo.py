"""`streamtune demo`: the whole product on one machine, with embedded defaults.

Starts the local broker and a local Ray, publishes the first MovieLens-100K events as a backlog,
then runs `streamtune up`'s own continual loop, with the loop's defaults, while the rest of the
stream is replayed in time order at a steady rate and a client keeps querying the live endpoint.
The demo trains nothing itself: it watches the versions the loop registers and the rollout
controller moves into Ray Serve, and scores them.

Quality is measured test-then-train per slice of the replay: the champion at the moment a slice's
first event is published cannot have trained on any of the slice's events. It is scored on them
(NDCG@10, full ranking) beside the first promoted version, which is never updated. Freshness per
event follows ``services.freshness``: published -> first live answer by a version trained on it.
"""

from __future__ import annotations

import logging
import random
import shutil
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import httpx
from pydantic import BaseModel, ConfigDict, Field
from rich.console import Console

from services.errors import ServiceError
from services.settings import Settings
from streams.events import Event

if TYPE_CHECKING:
    from services.loop import ContinualLoop
    from services.runtime import Running
    from training.registry import LoadedVersion, Registry

console = Console()
log = logging.getLogger(__name__)

# Bounds on the demo's own waits: a backlog that never reaches the buffer is a fault, a tail the
# loop does not train in time is reported as pending.
_BACKLOG_S = 300.0
_TAIL_S = 120.0


class DemoConfig(BaseModel):
    """Knobs of `streamtune demo` (the workload and the report; the loop keeps its defaults)."""

    model_config = ConfigDict(extra="forbid")

    events: int | None = Field(
        default=None, ge=1000, description="Replay only the first N events (default: all)."
    )
    rate: float = Field(default=300.0, gt=0, description="Replay rate in events/s.")
    first_round_events: int = Field(
        default=20_000,
        ge=100,
        description="Events published as a backlog before the loop starts (its first round).",
    )
    slice_events: int = Field(
        default=12_000, ge=100, description="Events per report row (a slice of the replay)."
    )
    eval_cases: int = Field(
        default=2000, ge=10, description="Events of a slice scored (seeded sample)."
    )
    query_rps: float = Field(default=20.0, ge=0, description="Live /recommend queries per second.")
    keep: bool = Field(default=False, description="Keep serving after the replay until Ctrl-C.")
    out: Path = Field(default=Path("out"), description="Folder for the plot and demo.json.")


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
    """A client hitting /recommend for random users, counting statuses and versions seen."""

    def __init__(self, url: str, users: list[str], rps: float) -> None:
        self.url, self.users, self.rps = url, users, rps
        self.ok = self.failed = 0
        self.first_seen: dict[int, float] = {}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="queries", daemon=True)

    def _run(self) -> None:
        rng = random.Random(0)
        with httpx.Client(timeout=10) as client:
            while not self.stop.wait(1.0 / self.rps):
                body = {"user_id": rng.choice(self.users), "k": 10}
                try:
                    r = client.post(f"{self.url}/recommend", json=body)
                    ok = r.status_code == 200
                except httpx.HTTPError:
                    ok = False
                if not self.first_seen and not ok:
                    continue  # nothing is deployed before the first version: not a failure
                if not ok:
                    self.failed += 1
                    continue
                self.ok += 1
                self.first_seen.setdefault(int(r.json()["version"]), time.time())


def demo_settings(s: Settings, run_dir: Path) -> Settings:
    """The user's settings with this run's own buffer, registry and topics (broker shared)."""
    d = s.model_dump()
    d["state_dir"] = run_dir
    d["buffer"].pop("path")
    d["registry"].pop("path")  # its own registry: never gated against another run's champion
    d["trainer"].pop("storage_path")
    tag = run_dir.name
    d["topics"].update(events=f"demo-{tag}.events", dead_letter=f"demo-{tag}.dlq")
    return Settings.model_validate(d)


class DemoInterrupted(ServiceError):
    """Ctrl-C or SIGTERM ended the demo before its replay was done (everything was stopped)."""


@dataclass
class _Started:
    """What the demo started, so that the main thread can stop it whatever the worker is doing."""

    running: Any = None
    broker: Any = None
    record: dict[str, Any] | None = None
    error: BaseException | None = None
    setup_done: threading.Event = field(default_factory=threading.Event)


def run_demo(settings: Settings, cfg: DemoConfig) -> dict[str, Any]:
    """The main job; returns the summary record (also written to ``out/demo.json``).

    The work runs in a thread; the main thread only waits, so Ctrl-C or SIGTERM at any moment
    (mid-round included, while the loop's thread is blocked in training) stops everything the
    demo started within seconds: ingest (flushed), Serve, Ray, and the broker if the demo started
    it.
    """
    from services.signals import stop_on_signals
    from services.stopping import shutdown

    stop = threading.Event()
    started = _Started()
    worker = threading.Thread(
        target=_guarded, args=(settings, cfg, stop, started), name="demo", daemon=True
    )
    with stop_on_signals(stop):
        worker.start()
        while worker.is_alive() and not stop.wait(0.5):
            pass
        if worker.is_alive():  # a signal: let a setup step in progress finish, then stop it all
            started.setup_done.wait(60)
        shutdown(started.running, started.broker, settings.supervisor.stop_timeout_s, say=_say)
    if started.error is not None:
        raise started.error
    if started.record is None:
        raise DemoInterrupted("demo interrupted; everything it started is stopped")
    return started.record


def _guarded(settings: Settings, cfg: DemoConfig, stop: threading.Event, st: _Started) -> None:
    try:
        st.record = _demo(settings, cfg, stop, st)
    except Exception as err:
        if not stop.is_set():  # errors after a stop come from Ray being shut down under us
            st.error = err
    finally:
        # The loop runs supervised, sharing ``stop``: one that kept failing ended the demo.
        failure = st.running.supervisor.failure if st.running is not None else None
        if failure is not None and st.error is None:
            st.error = failure
        st.setup_done.set()
        stop.set()


def _demo(
    settings: Settings, cfg: DemoConfig, stop: threading.Event, st: _Started
) -> dict[str, Any] | None:
    from services.cli_stream import ensure_broker
    from services.demo_report import report
    from services.runtime import init_ray, start
    from streams.broker import LocalBroker
    from streams.datasets import DEFAULT_ML100K, movielens_100k

    t_start = time.time()
    root = settings.state_dir / "demo"
    shutil.rmtree(root, ignore_errors=True)  # each demo starts from an empty buffer and registry
    s = demo_settings(settings, root / time.strftime("%Y%m%d-%H%M%S"))
    events = movielens_100k(DEFAULT_ML100K)[: cfg.events]
    if cfg.first_round_events >= len(events):
        raise ServiceError(
            f"the backlog ({cfg.first_round_events:,} events) must leave some of the "
            f"{len(events):,} events to replay live"
        )
    with console.status("starting the Kafka broker and Ray"):
        # A broker the demo starts, the demo stops; one the user already runs stays up.
        if s.embedded_broker and not LocalBroker(s.broker).status().answering:
            st.broker = LocalBroker(s.broker)
        ensure_broker(s)
        if stop.is_set():
            return None
        init_ray(None, s)  # from this thread Ray leaves the main thread's signal handlers alone
        if stop.is_set():
            return None
        st.running = running = start(s, serve_http=True, stop=stop)
        st.setup_done.set()
    assert running.controller is not None
    url = f"http://{s.serving.host}:{s.serving.port}"
    running.supervisor.add("rollout", running.controller.run)
    queries = Queries(url, sorted({e.user_id for e in events}), cfg.query_rps)
    if cfg.query_rps > 0:
        queries.thread.start()
    clock = Clock()
    try:
        watch = _stream(running, cfg, events, clock, queries, stop)
        if watch is None or not _wait_tail(running, queries, watch, len(events), stop):
            return None
    finally:
        queries.stop.set()
    if queries.thread.is_alive():  # its last answer lands before first_seen is read
        queries.thread.join(15)
    record = report(running, cfg, events, clock, watch, queries, time.time() - t_start)
    console.print(
        f"query it:  curl -s -X POST {url}/recommend -H 'content-type: application/json' "
        '-d \'{"user_id": "42", "k": 5}\''
    )
    if cfg.keep:
        console.print("serving until Ctrl-C (--keep) ...")
        st.record = record
        stop.wait()
    return record


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


def _stream(
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
    with console.status(f"publishing a backlog of {first:,} events"):
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
    with console.status(f"the loop's first version trains on the {first:,} backlog events"):

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


def _wait_tail(
    running: Running, queries: Queries, watch: StreamWatch, total: int, stop: threading.Event
) -> bool:
    """Until the loop has trained the whole stream and the newest promoted version answered live
    (so every event trained on is attributed to a live version). False on ``stop``.

    A rejected last round's events wait in the carry for events that will not come: they are
    reported as pending, as is whatever the loop has not trained within the bound.
    """
    loop, reg = running.loop, running.registry

    def idle() -> bool:
        watch.poll()
        champion = reg.champion()
        return (
            running.buffer.stats().rows >= total
            and loop.pending() == 0
            and champion is not None
            and (queries.rps == 0 or champion in queries.first_seen)
        )

    with console.status("waiting for the loop to train and serve the end of the stream"):
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


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)
