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

import shutil
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import Field
from rich.console import Console

from services.click_model import ClickModel
from services.demo_live import DemoClicks
from services.demo_replay import Clock, Queries, run_replay, wait_tail
from services.errors import ServiceError
from services.settings import Settings
from streams.config_base import StrictConfig
from streams.progress import working

# Clock and Queries belong to the replay; the benchmarks import them from here.
__all__ = ["Clock", "DemoConfig", "DemoInterrupted", "Queries", "demo_settings", "run_demo"]

console = Console()


class DemoConfig(StrictConfig):
    """Knobs of `streamtune demo` (the workload and the report; the loop keeps its defaults)."""

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
    live: Literal["off", "guard", "canary"] = Field(
        default="guard",
        description="rollout.live for this run: the demo shows live trials (guard: each new "
        "champion's lineage interleaved with a baseline minutes older), which `streamtune up` "
        "runs only when its settings ask for them.",
    )
    clicks: ClickModel = Field(
        default_factory=ClickModel,
        description="The simulated users' click model (fixed before the run and printed).",
    )
    click_delay_s: float = Field(
        default=1.0, ge=0, description="Seconds from an answer to its simulated clicks."
    )
    keep: bool = Field(default=False, description="Keep serving after the replay until Ctrl-C.")
    out: Path = Field(default=Path("out"), description="Folder for the plot and demo.json.")


def demo_settings(s: Settings, run_dir: Path, live: str | None = None) -> Settings:
    """The user's settings with this run's own buffer, registry and topics (broker shared), and
    ``live`` as rollout.live if given."""
    d = s.model_dump()
    if live is not None:
        d["rollout"]["live"] = live
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
    from services.runtime import start, start_broker_and_ray
    from streams.broker import LocalBroker
    from streams.datasets import DEFAULT_ML100K, movielens_100k

    t_start = time.time()
    root = settings.state_dir / "demo"
    shutil.rmtree(root, ignore_errors=True)  # each demo starts from an empty buffer and registry
    s = demo_settings(settings, root / time.strftime("%Y%m%d-%H%M%S"), cfg.live)
    events = movielens_100k(DEFAULT_ML100K)[: cfg.events]
    if cfg.first_round_events >= len(events):
        raise ServiceError(
            f"the backlog ({cfg.first_round_events:,} events) must leave some of the "
            f"{len(events):,} events to replay live"
        )
    with working("starting the Kafka broker and Ray"):
        # A broker the demo starts, the demo stops; one the user already runs stays up.
        if s.embedded_broker and not LocalBroker(s.broker).status().answering:
            st.broker = LocalBroker(s.broker)
        # From this thread Ray leaves the main thread's signal handlers alone.
        if not start_broker_and_ray(None, s, stop, lambda: ensure_broker(s)):
            return None
        st.running = running = start(s, serve_http=True, stop=stop)
        st.setup_done.set()
    assert running.controller is not None
    url = f"http://{s.serving.host}:{s.serving.port}"
    running.supervisor.add("rollout", running.controller.run)
    clock = Clock()
    clicks = None
    if cfg.live != "off":
        clicks = DemoClicks(events, cfg.clicks, s.kafka, s.topics.events, cfg.click_delay_s)
        console.print(f"live trials ({cfg.live}); simulated clicks: {cfg.clicks.describe()}, "
                      f"{cfg.click_delay_s:g} s after the answer")  # fmt: skip
    users = sorted({e.user_id for e in events})
    queries = Queries(url, users, cfg.query_rps, clicks, lambda: len(clock.times))
    if cfg.query_rps > 0:
        queries.thread.start()
    try:
        watch = run_replay(running, cfg, events, clock, queries, stop)
        if watch is None or not wait_tail(running, queries, watch, len(events), stop):
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


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)
