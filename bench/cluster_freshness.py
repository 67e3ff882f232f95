"""Model-path freshness on a 3-node cluster, with `up --address`'s defaults.

Part of ``python -m bench.cluster`` (alone: ``python -m bench.cluster --freshness-only``). What
runs is what `up --address ... --no-serve` runs beside `serve deploy deploy/serve.yaml`, with the
defaults of every setting except where things are placed: the broker (not embedded), the buffer,
registry and Ray Train storage on S3, rounds as tasks on training nodes
(``loop.round_on_cluster``), replicas on serving nodes, the control plane in the cluster. Any
other difference from the defaults is listed under ``settings_changed``.

As in ``bench.freshness``: the first version trains on MovieLens-100K's first 20,000 events, then
the rest is published at a steady rate while the loop runs continuous rounds (one long-lived Ray
Train run, its workers on the worker nodes) and a client queries the Serve app. An event's model
freshness is the first live answer from the version that first trained on it (or a later promoted
one) minus its publish time (``services.freshness``).
"""

from __future__ import annotations

import threading
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from bench.freshness import PLACES, breakdown, differences, model_freshness
from bench.raycluster import SERVE, TRAIN, LocalCluster
from services.demo import Clock, Queries
from services.runtime import start
from services.settings import Settings, load_settings
from streams.admin import ensure_topics
from streams.broker import LocalBroker, free_port
from streams.config import BrokerConfig, KafkaConfig, TopicsConfig
from streams.datasets import DEFAULT_ML100K, movielens_100k
from streams.producer import replay
from streams.s3server import S3Server
from streams.storage import StorageConfig

FIRST = 20_000

# Where things run and live on this cluster: what a cluster user sets, not how the system behaves.
CLUSTER_PLACES = PLACES | {
    "embedded_broker",
    "ingest.group_id",
    "buffer.storage.options",
    "registry.storage.options",
    "trainer.storage.options",
    "trainer.node_resource",
    "serving.node_resource",
    "loop.round_on_cluster",
    "rollout.in_cluster",
}


def cluster_settings(tmp: Path, kafka: KafkaConfig, topics: TopicsConfig, prefix: str,
                     opts: StorageConfig) -> Settings:  # fmt: skip
    store = opts.model_dump()
    return load_settings(
        state_dir=tmp / "state",
        embedded_broker=False,
        kafka=kafka.model_dump(),
        topics=topics.model_dump(),
        ingest={"group_id": "bench-fresh-ingest"},
        buffer={"path": f"{prefix}/buffer", "storage": store},
        registry={"path": f"{prefix}/registry", "storage": store},
        trainer={"storage_path": f"{prefix}/ray", "storage": store, "node_resource": TRAIN},
        loop={"round_on_cluster": True},
        serving={"node_resource": SERVE},
        rollout={"in_cluster": True},
    )


def _wait(cond: Any, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while not cond():
        if time.time() > deadline:
            raise TimeoutError(f"gave up waiting {timeout:.0f}s for {what}")
        time.sleep(0.5)


def freshness_on_cluster(cluster: LocalCluster, s3: S3Server, tmp: Path, seconds: float,
                         rate: float) -> dict[str, Any]:  # fmt: skip
    from bench.cluster import serve_env

    broker_cfg = BrokerConfig(port=free_port(), controller_port=free_port(),
                              state_dir=tmp / "kafka-fresh", heap="512m")  # fmt: skip
    broker = LocalBroker(broker_cfg)
    broker.up()
    stop = threading.Event()
    running = queries = None
    try:
        kafka = KafkaConfig(bootstrap_servers=broker_cfg.bootstrap)
        topics = TopicsConfig(events="fresh.events", dead_letter="fresh.dlq")
        ensure_topics(kafka, topics)
        prefix = f"s3://bench/fresh-{uuid.uuid4().hex[:8]}"
        s = cluster_settings(tmp, kafka, topics, prefix, StorageConfig(options=s3.options()))
        events = movielens_100k(DEFAULT_ML100K)
        steady = events[FIRST : FIRST + int(seconds * rate)]
        running = start(s, serve_http=False)
        replay(Clock().stamp(events[:FIRST]), s.kafka, s.topics.events)
        print(f"freshness: first version on {FIRST:,} events", flush=True)
        loop = threading.Thread(target=running.loop.run, args=(stop,), daemon=True)
        loop.start()
        _wait(lambda: running.registry.champion() is not None, 900, "the first version")
        port = free_port()
        cluster.serve_deploy(port, serve_env(s, tmp))
        users = sorted({e.user_id for e in events[:FIRST]})
        queries = Queries(f"http://127.0.0.1:{port}", users, rps=20.0)
        queries.thread.start()
        _wait(lambda: bool(queries.first_seen), 300, "the first version to be served")
        print(f"freshness: {len(steady):,} events at {rate:.0f}/s", flush=True)
        clock = Clock()
        replay(clock.stamp(steady), s.kafka, s.topics.events, rate=rate)
        try:  # the tail's last rounds
            _wait(lambda: model_freshness(running, queries, clock, steady)["pending"] == 0,
                  120, "the tail")  # fmt: skip
        except TimeoutError:
            print("freshness: the tail was not served by a covering version in 120 s")
        stop.set()
        queries.stop.set()
        model = model_freshness(running, queries, clock, steady)
        rounds = [r for r in breakdown(running, queries) if r["version"] > 1]
        changed = differences(s, CLUSTER_PLACES)
        failed = queries.failed
    finally:
        stop.set()
        if queries is not None:
            queries.stop.set()
        if running is not None:
            running.stop(timeout=30)
            running.loop.close()
        broker.down()
    m = np.asarray(model["s"])
    pct = lambda q: round(float(np.percentile(m, q)), 2) if len(m) else None  # noqa: E731
    phases = ["read", "prepare", "train", "gate", "register", "rollout", "total"]
    return {
        "rate": rate,
        "model_p50_s": pct(50),
        "model_p99_s": pct(99),
        "model_samples": len(m),
        "model_pending": model["pending"],
        "model_never_trained": model["never_trained"],
        "rounds": len(rounds),
        "consolidation_rounds": sum(r["kind"] == "consolidation" for r in rounds),
        "round_breakdown_s": {
            p: round(float(np.mean([r[p] for r in rounds if p in r])), 3)
            for p in phases
            if any(p in r for r in rounds)
        },
        "failed_requests": failed,
        "settings_changed": changed,
        "goals": {
            "model_p50_under_5s": pct(50) is not None and pct(50) <= 5,  # type: ignore[operator]
            "model_p99_under_15s": pct(99) is not None and pct(99) <= 15,  # type: ignore[operator]
            "none_pending": model["pending"] == 0,
            "none_never_trained": model["never_trained"] == 0,
        },
    }


def print_freshness(res: dict[str, Any]) -> None:
    print(f"model freshness on the cluster at {res['rate']:.0f} events/s: "
          f"p50 {res['model_p50_s']} s, p99 {res['model_p99_s']} s over {res['model_samples']:,} "
          f"events; {res['model_pending']} pending, {res['model_never_trained']} never trained; "
          f"{res['rounds']} rounds ({res['consolidation_rounds']} consolidation); "
          f"{res['failed_requests']} failed requests", flush=True)  # fmt: skip
    print("mean round parts (s): " + ", ".join(f"{k} {v}" for k, v in
          res["round_breakdown_s"].items()), flush=True)  # fmt: skip
    print(f"settings changed beyond placement: {res['settings_changed'] or 'none'}", flush=True)
