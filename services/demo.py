"""`streamtune demo`: the whole product on one machine, with embedded defaults.

Starts the local broker and a local Ray, replays MovieLens-100K into Kafka in time order at an
accelerated rate, ingests it exactly once, and lets the continual loop train rounds that the
rollout controller moves into Ray Serve while a client thread keeps querying the live endpoint.

Quality is measured test-then-train: when a round starts, the events it is about to learn from
have not been trained on by anyone, so they are the "next slice" of the version serving at that
moment. Each version is scored on it (NDCG@10, full ranking) beside the very first version, which
is never updated. That comparison is what the table and the plot show.
"""

from __future__ import annotations

import json
import random
import shutil
import sys
import threading
import time
from bisect import bisect_left
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from pydantic import BaseModel, ConfigDict, Field
from rich.console import Console

from services.errors import ServiceError
from services.settings import Settings
from streams.events import Event

console = Console()


class DemoConfig(BaseModel):
    """Knobs of `streamtune demo`; defaults finish in well under 10 minutes on 2 cores."""

    model_config = ConfigDict(extra="forbid")

    events: int | None = Field(
        default=None, ge=1000, description="Replay only the first N events (default: all)."
    )
    rate: float = Field(default=300.0, gt=0, description="Replay rate in events/s.")
    first_round_events: int = Field(
        default=20_000, ge=100, description="Events the first version (the static baseline) sees."
    )
    round_events: int = Field(
        default=12_000, ge=100, description="Train again once this many new events are buffered."
    )
    eval_cases: int = Field(
        default=2000, ge=10, description="Next-slice events scored per round (seeded sample)."
    )
    query_rps: float = Field(default=20.0, ge=0, description="Live /recommend queries per second.")
    keep: bool = Field(default=False, description="Keep serving after the replay until Ctrl-C.")
    out: Path = Field(default=Path("out"), description="Folder for the plot and demo.json.")


@dataclass
class Row:
    """One round of the demo table."""

    version: int | None
    decision: str
    new_events: int
    covered: int
    reason: str = ""
    ndcg_next: float | None = None  # this version on the slice that arrived after it
    ndcg_static: float | None = None  # the never-updated first version on the same slice
    newest_published: float = 0.0  # wall time the newest event it covers was published
    served_at: float | None = None  # first live response that named this version
    rollout_s: float | None = None


@dataclass
class Clock:
    """Wall time at which the n-th replayed event was handed to the producer."""

    counts: list[int] = field(default_factory=list)
    times: list[float] = field(default_factory=list)

    def stamp(self, events: list[Event]) -> Iterator[Event]:
        for n, event in enumerate(events):
            if n % 200 == 0:
                self.counts.append(n)
                self.times.append(time.time())
            yield event

    def published(self, n: int) -> float:
        """When event number ``n`` (0-based) was published, to within one 200-event stamp."""
        i = min(bisect_left(self.counts, n), len(self.times) - 1)
        return self.times[i] if self.times else time.time()


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
    (mid-round included, while the worker is blocked in ``trainer.fit``) stops everything the demo
    started within seconds: ingest (flushed), Serve, Ray, and the broker if the demo started it.
    """
    from services.runtime import shutdown, stop_on_signals

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
        st.setup_done.set()
        stop.set()


def _demo(
    settings: Settings, cfg: DemoConfig, stop: threading.Event, st: _Started
) -> dict[str, Any] | None:
    from services.cli_stream import ensure_broker
    from services.demo_report import plot, summary, table
    from services.runtime import init_ray, start
    from streams.broker import LocalBroker
    from streams.datasets import DEFAULT_ML100K, movielens_100k
    from streams.producer import replay

    t_start = time.time()
    root = settings.state_dir / "demo"
    shutil.rmtree(root, ignore_errors=True)  # each demo starts from an empty buffer and registry
    s = demo_settings(settings, root / time.strftime("%Y%m%d-%H%M%S"))
    s.loop.min_new_events = cfg.round_events
    s.loop.min_round_events = min(1000, cfg.round_events)
    s.loop.max_wait_s = 3600.0  # the demo decides when the replay is over
    events = movielens_100k(DEFAULT_ML100K)[: cfg.events]
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
    producer = threading.Thread(
        target=replay,
        args=(clock.stamp(events), s.kafka, s.topics.events),
        kwargs={"rate": cfg.rate},
        name="producer",
        daemon=True,
    )
    producer.start()
    console.print(
        f"replaying {len(events):,} MovieLens-100K events at {cfg.rate:.0f}/s into "
        f"{s.topics.events}; Serve at {url}; dashboard at http://127.0.0.1:8265"
    )
    rows: list[Row] = []
    static = None
    loop, buf, reg = running.loop, running.buffer, running.registry
    want = cfg.first_round_events  # the next round's slice size
    try:
        while not stop.is_set():
            ingested = buf.stats().rows
            done = not producer.is_alive() and ingested >= len(events)
            due = loop.pending() >= want
            if not (due or (done and loop.pending() >= s.loop.min_round_events)):
                if done:
                    break
                stop.wait(1.0)
                continue
            after = loop.trained_watermark()
            upto, new = _next_slice(buf, after, want)
            champion = reg.champion()
            if champion is not None and static is not None:
                before = buf.read(upto=after)
                _score_next_slice(rows, reg.load(champion), static, before, new, cfg, s)
            with console.status(f"round {len(rows) + 1}: training on {new.num_rows:,} events"):
                result = loop.run_once(upto=upto)
            if result is None:  # too small to train or to gate: wait for more, if more will come
                if done and upto == buf.watermark():  # nothing left to grow the slice with
                    console.print(f"the last {loop.pending():,} events: {loop.last_skip}")
                    break
                want += s.loop.min_round_events  # too small to gate: the slice grows
                continue
            want = cfg.round_events
            covered = sum(upto.values())
            row = Row(result.version, "promote" if result.promoted else "reject",
                      result.new_events, covered, result.reason,
                      newest_published=clock.published(covered - 1))  # fmt: skip
            rows.append(row)
            if static is None and result.promoted:
                static = reg.load(result.version)  # kept in memory: pruning cannot take it
            console.print(
                f"v{result.version}: {row.decision} after {result.new_events:,} new events "
                f"({covered:,} in all) - {result.reason}"
            )
        if stop.is_set():
            return None
        _wait_served(rows, reg.champion(), queries, running.controller)
    finally:
        queries.stop.set()
    for r in rows:
        r.served_at = queries.first_seen.get(r.version) if r.version is not None else None
        ev = [e for e in running.controller.events if (e.version, e.kind) == (r.version, "rollout")]
        r.rollout_s = ev[0].seconds if ev else None
    console.print(table(rows))
    record = summary(rows, queries, time.time() - t_start, len(events))
    cfg.out.mkdir(parents=True, exist_ok=True)
    record["plot"] = str(plot(rows, cfg.out / "demo_quality.png"))
    (cfg.out / "demo.json").write_text(json.dumps(record, indent=2))
    console.print(f"plot: {record['plot']}")
    console.print(
        f"query it:  curl -s -X POST {url}/recommend -H 'content-type: application/json' "
        '-d \'{"user_id": "42", "k": 5}\''
    )
    if cfg.keep:
        console.print("serving until Ctrl-C (--keep) ...")
        st.record = record
        stop.wait()
    return record


def _next_slice(buf: Any, after: dict[str, int], n: int) -> tuple[dict[str, int], Any]:
    """The watermark closing the next ~``n`` buffered events (time order) past ``after``, and them.

    A round takes one slice of the configured size even when more has arrived while the previous
    round trained, so the demo's slices, and the quality table, do not depend on how fast the
    machine is: on a slow one, rounds fall behind the replay instead of swallowing the rest of it
    (which would leave the last version no next slice to be scored on).
    """
    from streams.offsets import tp_key

    upto = buf.watermark()
    new = buf.read(after=after, upto=upto)
    if new.num_rows <= n:
        return upto, new
    head = new.slice(0, n)
    capped = {k: min(after.get(k, 0), end) for k, end in upto.items()}
    for topic, part, off in zip(
        head.column("topic").to_pylist(),
        head.column("partition").to_pylist(),
        head.column("offset").to_pylist(),
        strict=True,
    ):
        k = tp_key(topic, part)
        capped[k] = max(capped.get(k, 0), off + 1)
    return capped, buf.read(after=after, upto=capped)


def _score_next_slice(
    rows: list[Row], current: Any, static: Any, before: Any, new: Any, cfg: DemoConfig, s: Settings
) -> None:
    """Test-then-train: the serving champion and the static v1 on events nobody trained on yet."""
    from training.data import next_slice_holdout
    from training.metrics import evaluate

    scores = {}
    for name, lv in (("champion", current), ("static", static)):
        hold = next_slice_holdout(before, new, lv.vocab, s.model.max_len, cfg.eval_cases, len(rows))
        scores[name] = evaluate(lv.model, hold)["ndcg10"]
    for r in rows:
        if r.version == current.version:
            r.ndcg_next, r.ndcg_static = scores["champion"], scores["static"]


def _wait_served(rows: list[Row], champion: int | None, queries: Queries, ctl: Any) -> None:
    """Give the last rollout time to reach the live endpoint (bounded)."""
    deadline = time.time() + 60
    while champion is not None and time.time() < deadline:
        answered = queries.first_seen.get(champion) or queries.rps == 0
        # The controller records its choice before it deploys (replicas follow the record), so
        # ask for its event, which it emits once the deployment returned.
        if answered and any(e.version == champion for e in ctl.events):
            return
        time.sleep(0.5)


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)
