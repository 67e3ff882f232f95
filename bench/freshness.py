"""Freshness: how soon a published event changes what /recommend answers.

    python -m bench.freshness [--quick] [--seconds S] [--rate R]

The system runs with `streamtune up`'s defaults (only where state lives, the ports and the topic
names differ; anything else that differs is listed under ``settings_changed`` in the JSON line),
in one process tree, as `up` runs it: a local Kafka broker,
ingest into the buffer, the continual loop (training rounds on Ray Train + DeepSpeed), the rollout
controller and Ray Serve. MovieLens-100K is produced at a steady rate after a first version has
been trained on its first 20,000 events. Two clocks:

(a) history path: a probe publishes a click, then polls that user's /recommend until every
    replica has answered with a history that holds it (answers name their replica); published
    -> visible everywhere, in ms. Half the probes are a new user's first click, half a second
    click by a user whose first one every replica already shows. The probe runs in a process
    of its own.
(b) model path: each replayed event's publish time is stamped, and its (partition, offset) is
    read back from the buffer. The loop's round records say which promoted version first
    trained on it (its own round's, or, if that round was rejected, the round that carried it
    forward: ``services.freshness``). Its model freshness is the first live /recommend answer
    from that version or a later promoted one minus its publish time, in seconds. Events let go
    from the carry are counted as never trained; events no served version trained on by the
    end, as pending.

Each round's parts (trigger wait, data read, prepare, train, gate, register, and rollout: from
registration to the version's first live answer) are printed per round and averaged in the JSON
as ``round_breakdown_s``.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from bench.history_probe import probe_history_apart
from services.demo import Clock, Queries
from services.freshness import Ledger
from services.runtime import init_ray, start
from services.settings import Settings, load_settings
from streams.admin import ensure_topics
from streams.broker import LocalBroker, free_port
from streams.datasets import DEFAULT_ML100K, movielens_100k
from streams.events import Event
from streams.producer import replay

console = Console(stderr=True)
OUT = Console(width=130)  # tables for logs, not an 80-column terminal
FIRST = 20_000


def bench_settings(root: Path) -> Settings:
    """``up``'s defaults; only where state lives, the ports and the topic names differ."""
    return load_settings(
        state_dir=root,
        broker={"port": free_port(), "controller_port": free_port()},
        topics={"events": "fresh.events", "dead_letter": "fresh.dlq"},
        serving={"port": free_port()},
    )


# Settings a run on this machine must be free to place elsewhere; anything else that differs
# from `up`'s defaults is printed in the JSON line.
PLACES = {"state_dir", "broker.port", "broker.controller_port", "topics.events",
          "topics.dead_letter", "serving.port", "buffer.path", "registry.path",
          "trainer.storage_path", "broker.state_dir", "kafka.bootstrap_servers"}  # fmt: skip


def shipped() -> Settings:
    """``up``'s defaults as shipped: without this process's STREAMTUNE_* variables, which
    ``load_settings`` reads for the run's settings and would otherwise read for the defaults."""
    prefix = Settings.model_config.get("env_prefix") or "STREAMTUNE_"
    saved = {k: os.environ.pop(k) for k in list(os.environ) if k.upper().startswith(prefix)}
    try:
        return load_settings()
    finally:
        os.environ.update(saved)


def differences(s: Settings, places: set[str] = PLACES) -> dict[str, Any]:
    """Every setting of ``s`` that is not ``up``'s default, apart from ``places``."""

    def flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in d.items():
            key = f"{prefix}{k}"
            out.update(flat(v, f"{key}.") if isinstance(v, dict) else {key: v})
        return out

    mine, default = flat(s.model_dump(mode="json")), flat(shipped().model_dump(mode="json"))
    placed = lambda k: any(k == p or k.startswith(f"{p}.") for p in places)  # noqa: E731
    return {k: v for k, v in mine.items() if default.get(k) != v and not placed(k)}


def run(seconds: float, rate: float, probes: int) -> dict[str, Any]:
    import ray
    from ray import serve

    root = Path(tempfile.mkdtemp(prefix="bench-freshness-"))
    s = bench_settings(root)
    broker = LocalBroker(s.broker)
    events = movielens_100k(DEFAULT_ML100K)
    steady = events[FIRST : FIRST + int(seconds * rate)]
    console.print("starting Kafka, Ray, ingest, the loop and Serve ...")
    broker.up()
    stop = threading.Event()
    try:
        ensure_topics(s.kafka, s.topics)
        init_ray(None, s, dashboard=False)
        running = start(s, serve_http=True)
        assert running.controller is not None
        url = f"http://{s.serving.host}:{s.serving.port}"
        queries = Queries(url, sorted({e.user_id for e in events[:FIRST]}), rps=20.0)
        queries.thread.start()
        threading.Thread(target=running.controller.run, args=(stop,), daemon=True).start()
        clock = Clock()
        replay(clock.stamp(events[:FIRST]), s.kafka, s.topics.events)
        console.print(f"first version: training on {FIRST:,} events")
        loop = threading.Thread(target=running.loop.run, args=(stop,), daemon=True)
        loop.start()
        wait_for(lambda: bool(queries.first_seen), 600, "the first version to be served")
        console.print(f"steady: {len(steady):,} events at {rate:.0f}/s, history probes alongside")
        steady_clock = Clock()
        producer = threading.Thread(
            target=replay,
            args=(steady_clock.stamp(steady), s.kafka, s.topics.events),
            kwargs={"rate": rate},
            daemon=True,
        )
        t_steady = time.time()
        producer.start()
        hist = probe_history_apart(s, probes, (events[0].item_id, events[1].item_id))
        producer.join()
        # Let the loop train on the tail once more, so events late in the run get a chance too.
        # (Not in time, e.g. the last round was too small to gate: reported as pending.)
        if not served_all(running, queries, steady_clock, steady, 120):
            console.print("the tail of the stream was not served by a covering version in 120s")
        stop.set()
        queries.stop.set()
        model = model_freshness(running, queries, steady_clock, steady)
        rounds_detail = breakdown(running, queries)
        rounds = [r["version"] for r in running.loop.state()["rounds"] if r["version"] > 1]
        changed = differences(s)
        running.stop()
        running.loop.close()  # the long-lived run, if any, before Ray goes down
        serve.shutdown()
        ray.shutdown()
    finally:
        stop.set()
        broker.down()
    return {"history_ms": hist, "model": model, "rounds": len(rounds), "t_steady": t_steady,
            "breakdown": rounds_detail, "settings_changed": changed}  # fmt: skip


def wait_for(cond: Any, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while not cond():
        if time.time() > deadline:
            raise TimeoutError(f"gave up waiting {timeout:.0f}s for {what}")
        time.sleep(0.5)


def served_all(running: Any, queries: Queries, clock: Clock, events: list[Event],
               timeout: float) -> bool:  # fmt: skip
    """Waits until every one of ``events`` is served by a version trained on it; False if that
    took longer than ``timeout``."""
    try:
        wait_for(lambda: model_freshness(running, queries, clock, events)["pending"] == 0,
                 timeout, "every event served")  # fmt: skip
        return True
    except TimeoutError:
        return False


def pct(a: Any, q: float) -> float | None:
    """The ``q``th percentile of ``a``, rounded; None (not measured) when ``a`` is empty."""
    return round(float(np.percentile(a, q)), 2) if len(a) else None


def mean_phases(rounds: list[dict[str, Any]], phases: list[str]) -> dict[str, float]:
    """Each phase's mean over the rounds that recorded it."""
    return {
        p: round(float(np.mean([r[p] for r in rounds if p in r])), 3)
        for p in phases
        if any(p in r for r in rounds)
    }


def model_freshness(
    running: Any, queries: Queries, clock: Clock, steady: list[Event]
) -> dict[str, Any]:
    """Per steady event: first live answer by the version that first trained on it (its own
    round's, or the one that carried a rejected round forward) or a later promoted version,
    minus its publish time. Events let go from the carry are counted apart, never trained."""
    records = running.loop.state()["rounds"]
    ledger = Ledger(records)
    rows = running.buffer.read(columns=["event_id", "topic", "partition", "offset"]).to_pylist()
    where = {r["event_id"]: (f"{r['topic']}:{r['partition']}", r["offset"]) for r in rows}
    first_seen = dict(queries.first_seen)
    rejected = [(r.get("after_watermark", {}), r["watermark"]) for r in records
                if not r["promoted"]]  # fmt: skip
    lat, pending, never, carried = [], 0, 0, 0
    why: Counter[str] = Counter()  # where the pending events stand
    for i, event in enumerate(steady):
        if event.event_id not in where:
            pending += 1
            why["not in the buffer"] += 1
            continue
        tp, offset = where[event.event_id]
        v = ledger.first_trained_by(tp, offset)
        t = ledger.live_at(v, first_seen) if v is not None else None
        if v is None and ledger.dropped(tp, offset):
            never += 1
        elif t is None:
            pending += 1
            why["no promoted version trained on it" if v is None
                else f"trained by v{v}, which no answer showed"] += 1  # fmt: skip
        else:
            lat.append(t - clock.published(i))
            carried += any(lo.get(tp, 0) <= offset < hi.get(tp, 0) for lo, hi in rejected)
    return {"s": lat, "pending": pending, "never_trained": never, "carried": carried,
            "pending_why": dict(why), "versions": len(first_seen)}  # fmt: skip


def breakdown(running: Any, queries: Queries) -> list[dict[str, Any]]:
    """Each round's parts in seconds (the loop's record), with its version's rollout."""
    out = []
    for rec in running.loop.state()["rounds"]:
        v = rec["version"]
        row = {"version": v, "kind": rec.get("kind", "incremental"), "promoted": rec["promoted"],
               "reason": rec.get("reason", ""), **rec.get("phases", {})}  # fmt: skip
        seen = queries.first_seen.get(v)
        if seen is not None and "registered_at" in rec:  # versions may be pruned: the record
            row["rollout"] = seen - rec["registered_at"]
        row["total"] = rec["seconds"] + row.get("trigger_wait", 0.0) + row.get("rollout", 0.0)
        out.append(row)
    return out


def rejections(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """How many rounds the gate rejected, the longest run of them (the events of a run wait for
    the next promotion), and which check each failed (the gate's reason up to its figures)."""
    streak, longest, checks = 0, 0, Counter[str]()
    for r in rounds:
        streak = 0 if r["promoted"] else streak + 1
        longest = max(longest, streak)
        if not r["promoted"]:
            checks[(r["reason"] or "unknown").split(" NDCG@10", 1)[0].split(" (", 1)[0]] += 1
    return {"rejected": sum(checks.values()), "longest_streak": longest, "by_check": dict(checks)}


def report(res: dict[str, Any], rate: float) -> dict[str, Any]:
    h = np.asarray(res["history_ms"]["new"] + res["history_ms"]["earlier"])
    hn, he = np.asarray(res["history_ms"]["new"]), np.asarray(res["history_ms"]["earlier"])
    m = np.asarray(res["model"]["s"])
    table = Table(title=f"Freshness at {rate:.0f} events/s (published -> answered by /recommend)")
    for col in ("path", "samples", "p50", "p99", "max"):
        table.add_column(col, justify="right")
    hf = np.asarray(res["history_ms"].get("first", []))
    hk = np.asarray(res["history_ms"].get("kafka", []))
    for name, x in (("history (ms)", h), ("  new users", hn), ("  users with history", he),
                    ("  to the first replica", hf), ("  readable from Kafka", hk)):  # fmt: skip
        table.add_row(name, str(len(x)), str(pct(x, 50)), str(pct(x, 99)), str(pct(x, 100)))
    table.add_row("model (s)", str(len(m)), str(pct(m, 50)), str(pct(m, 99)), str(pct(m, 100)))
    OUT.print(table)
    OUT.print(
        f"{res['rounds']} promoted-or-rejected rounds after the first version; "
        f"{res['model']['carried']} events first in a rejected round, trained by a later one; "
        f"{res['model']['never_trained']} never trained on (let go from the carry); "
        f"{res['model']['pending']} not yet served by a version trained on them"
        + (f" ({res['model']['pending_why']})" if res["model"]["pending"] else "")
    )
    phases = ["trigger_wait", "read", "prepare", "train", "gate", "register", "rollout", "total"]
    rounds = [r for r in res["breakdown"] if r["version"] > 1]  # the first version: setup
    per = Table(title="Rounds after the first version (s)")
    for col in ("version", "kind", "promoted", *phases):
        per.add_column(col, justify="right")
    for r in rounds:
        per.add_row(str(r["version"]), r["kind"], str(r["promoted"]),
                    *(f"{r[p]:.2f}" if p in r else "-" for p in phases))  # fmt: skip
    OUT.print(per)
    rejected = rejections(rounds)
    OUT.print(f"rejected rounds: {rejected}")
    breakdown = mean_phases(rounds, phases)
    return {
        "bench": "freshness",
        "rate": rate,
        "history_p50_ms": pct(h, 50),
        "history_p99_ms": pct(h, 99),
        "history_samples": len(h),
        "history_p99_ms_new_users": pct(hn, 99),
        "history_p99_ms_users_with_history": pct(he, 99),
        "history_first_replica_p50_ms": pct(hf, 50),
        "history_first_replica_p99_ms": pct(hf, 99),
        "history_kafka_p50_ms": pct(hk, 50),
        "history_kafka_p99_ms": pct(hk, 99),
        "model_p50_s": pct(m, 50),
        "model_p99_s": pct(m, 99),
        "model_samples": len(m),
        "model_pending": res["model"]["pending"],
        "model_pending_why": res["model"]["pending_why"],
        "model_never_trained": res["model"]["never_trained"],
        "model_carried": res["model"]["carried"],
        "rounds": res["rounds"],
        "consolidation_rounds": sum(r["kind"] == "consolidation" for r in rounds),
        "round_breakdown_s": breakdown,
        "rejections": rejected,
        "settings_changed": res["settings_changed"],
        "goals": {
            "history_p99_under_100ms": bool(len(h) and pct(h, 99) <= 100),  # type: ignore[operator]
            "model_p50_under_2s": bool(len(m) and pct(m, 50) <= 2),  # type: ignore[operator]
            "model_p99_under_5s": bool(len(m) and pct(m, 99) <= 5),  # type: ignore[operator]
            "none_pending": res["model"]["pending"] == 0,
            "none_never_trained": res["model"]["never_trained"] == 0,
        },
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m bench.freshness", description=__doc__.split("\n")[0]
    )
    p.add_argument("--seconds", type=float, default=180.0, help="steady production time")
    p.add_argument("--rate", type=float, default=100.0, help="events/s during the steady phase")
    p.add_argument("--probes", type=int, default=60, help="history probes (new users)")
    p.add_argument("--quick", action="store_true", help="90 s of steady production")
    a = p.parse_args(argv)
    if a.rate <= 0 or a.seconds <= 0:
        p.error("--rate and --seconds must be positive")
    seconds = 90.0 if a.quick else a.seconds
    record = report(run(seconds, a.rate, a.probes), a.rate)
    print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
