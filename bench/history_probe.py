"""The history path's probe for ``bench.freshness``: publish a click, then poll that user's
/recommend until every replica answers with it.

Three clocks per probe, all from the publish: when a consumer of the events topic in a process
of its own sees the click (``kafka``: the broker's share, the same kind of consumer the history
shards run; ``bench.arrival_clock``), when the first replica answers with it (``first``), and
when every replica has (the probe's figure, ``new`` or ``earlier``). What lies between ``kafka``
and ``first`` is the shard and the replicas' caches; between ``first`` and every replica, the
other replicas' feeds.

    python -m bench.history_probe [--probes N] [--rate R]

measures the first clock alone on a quiet machine: the same local broker ``up`` starts, events
at the same rate, no Ray, no training, no serving. It is the broker's floor under that leg.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import tempfile
import threading
import time
import uuid
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from rich.console import Console
from rich.table import Table

from bench.arrival_clock import ArrivalClock, timed_id
from services.settings import Settings
from serving.heap import freeze_startup
from serving.http_guard import REPLICA_HEADER
from streams.admin import ensure_topics
from streams.broker import LocalBroker, free_port
from streams.config import KafkaConfig, TopicsConfig
from streams.datasets import DEFAULT_ML100K, movielens_100k
from streams.events import Event, EventType
from streams.producer import make_producer, replay


def probe_history(
    kafka: KafkaConfig, topics: TopicsConfig, url: str, n: int, items: tuple[str, str],
    replicas: int,
) -> dict[str, list[float]]:  # fmt: skip
    """ms from publishing a click to the moment every replica has answered /recommend with it:
    half the probes a new user's first click, half a second click by a user whose first one
    every replica already shows. Answers name their replica (``REPLICA_HEADER``). ``first``: the
    same probes, to the first answer with it from any replica; ``kafka``: to the click being
    readable from the topic."""
    # The probe is the client: a full collection of its own start-up heap (its process imports
    # what the benchmark's does, ~300 ms a collection) would be timed as the system's latency.
    freeze_startup()
    prod = warm_producer(kafka, topics.events)
    arrivals = ArrivalClock(kafka, topics, _group())
    out: dict[str, list[float]] = {"new": [], "earlier": [], "first": [], "kafka": []}
    with httpx.Client(timeout=5) as client:
        for i in range(n):
            user = f"probe-{time.time_ns()}-{i}"
            kind = "earlier" if i % 2 else "new"
            if kind == "earlier":  # its first click, untimed, everywhere before the timed one
                _click(prod, topics.events, user, items[0], f"{user}-first")
                if _everywhere(client, url, user, 1, replicas) is None:
                    continue
            t0 = time.perf_counter()
            _click(prod, topics.events, user, items[1], timed_id(user))
            done = _everywhere(client, url, user, 2 if kind == "earlier" else 1, replicas)
            if done is not None:
                out[kind].append((done[1] - t0) * 1000)
                out["first"].append((done[0] - t0) * 1000)
                seen = arrivals.at(timed_id(user))
                if seen is not None:
                    out["kafka"].append((seen - t0) * 1000)
            time.sleep(0.3)
    arrivals.close()
    prod.close()
    return out


def _group() -> str:
    return f"bench-probe-{uuid.uuid4().hex[:8]}"


def warm_producer(kafka: KafkaConfig, topic: str) -> Any:
    """A producer that has sent once: its first send fetches the topic's metadata and an
    idempotent producer id (~150-180 ms here), which no probe should be timed with."""
    prod = make_producer(kafka)
    user = f"probe-warm-{time.time_ns()}"
    _click(prod, topic, user, "1", f"{user}-warm")
    return prod


def _click(prod: Any, topic: str, user: str, item: str, event_id: str) -> None:
    event = Event(event_id=event_id, user_id=user, item_id=item,
                  event_type=EventType.CLICK, value=1.0, ts=int(time.time() * 1000))  # fmt: skip
    prod.send(topic, key=event.key(), value=event.encode())
    prod.flush()


def _everywhere(
    client: httpx.Client, url: str, user: str, length: int, replicas: int
) -> tuple[float, float] | None:
    """perf_counter times at which the first replica, and then ``replicas`` distinct replicas,
    have answered for ``user`` with a history of ``length`` items; None after 10 s."""
    seen: set[str] = set()
    first: float | None = None
    deadline = time.perf_counter() + 10
    while time.perf_counter() < deadline:
        r = client.post(url, json={"user_id": user, "k": 10})
        if r.status_code == 200 and r.json()["history_len"] >= length:
            now = time.perf_counter()
            first = now if first is None else first
            seen.add(r.headers.get(REPLICA_HEADER, ""))
            if len(seen) >= replicas:
                return first, now
        time.sleep(0.01)
    return None


def probe_history_apart(s: Settings, n: int, items: tuple[str, str]) -> dict[str, list[float]]:
    """``probe_history`` from a process of its own, as a user's client runs: in the benchmark's
    it would share the interpreter lock with ingest and the loop's thread, and time them too."""
    url = f"http://{s.serving.host}:{s.serving.port}/recommend"
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        job = pool.submit(probe_history, s.kafka, s.topics, url, n, items, s.serving.replicas)
        return job.result()


def kafka_only(probes: int, rate: float) -> dict[str, Any]:
    """Publish -> readable on a quiet machine: a local broker, MovieLens-100K at ``rate``."""
    from services.settings import load_settings

    freeze_startup()  # as in probe_history
    root = Path(tempfile.mkdtemp(prefix="bench-probe-"))
    s = load_settings(state_dir=root, broker={"port": free_port(), "controller_port": free_port()})
    broker = LocalBroker(s.broker)
    broker.up()
    try:
        ensure_topics(s.kafka, s.topics)
        # The stream ends before the probes do (each takes >= 0.3 s), so it is joined cleanly.
        events = movielens_100k(DEFAULT_ML100K)[: int(rate * probes * 0.3)]
        stream = threading.Thread(
            target=replay, args=(events, s.kafka, s.topics.events), kwargs={"rate": rate},
            daemon=True,
        )  # fmt: skip
        stream.start()
        prod = warm_producer(s.kafka, s.topics.events)
        arrivals = ArrivalClock(s.kafka, s.topics, _group())
        acked, readable = [], []
        for i in range(probes):
            user = f"probe-{time.time_ns()}-{i}"
            t0 = time.perf_counter()
            # returns once the broker acked
            _click(prod, s.topics.events, user, "1", timed_id(user))
            t_ack = time.perf_counter()
            seen = arrivals.at(timed_id(user), timeout=10)
            if seen is not None:
                acked.append((t_ack - t0) * 1000)
                readable.append((seen - t0) * 1000)
            time.sleep(0.3)
        stream.join()
        arrivals.close()
        prod.close()
    finally:
        broker.down()
    out: dict[str, Any] = {"bench": "history_probe", "rate": rate, "samples": len(readable)}
    table = Table(title=f"publish -> ..., a quiet local broker, {rate:.0f} events/s (ms)")
    for col in ("clock", "samples", "p50", "p99", "max"):
        table.add_column(col, justify="right")
    for name, x in (("acked (send + flush)", acked), ("readable by a consumer", readable)):
        q = [round(float(np.percentile(x, p)), 2) if x else None for p in (50, 99, 100)]
        table.add_row(name, str(len(x)), *("-" if v is None else str(v) for v in q))
        key = "acked" if name.startswith("acked") else "kafka"
        out.update({f"{key}_p50_ms": q[0], f"{key}_p99_ms": q[1], f"{key}_max_ms": q[2]})
    Console().print(table)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.history_probe", description=__doc__)
    p.add_argument("--probes", type=int, default=60, help="timed clicks")
    p.add_argument("--rate", type=float, default=100.0, help="background events/s")
    a = p.parse_args(argv)
    if a.probes <= 0 or a.rate <= 0:
        p.error("--probes and --rate must be positive")
    print(json.dumps(kafka_only(a.probes, a.rate)), flush=True)


if __name__ == "__main__":
    main()
