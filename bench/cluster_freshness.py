"""Model-path freshness on a 3-node cluster with `up --address`'s defaults, and `up` restarted.

Part of ``python -m bench.cluster`` (alone: ``python -m bench.cluster --freshness-only``). What
runs is `streamtune up --address ... --no-serve`, a process of its own, beside `serve deploy
deploy/serve.yaml`, with the defaults of every setting except where things are placed: the broker
(not embedded), the buffer, registry and Ray Train storage on S3, rounds as tasks on training nodes
(``loop.round_on_cluster``), replicas on serving nodes, the control plane in the cluster. Any
other difference from the defaults is listed under ``settings_changed``.

As in ``bench.freshness``: the first version trains on MovieLens-100K's first 20,000 events, then
the rest is published at a steady rate while the loop runs continuous rounds (one long-lived Ray
Train run, its workers on the worker nodes) and a client queries the Serve app. An event's model
freshness is the first live answer from the version that first trained on it (or a later promoted
one) minus its publish time (``services.freshness``).

Then `up` is SIGKILLed while the stream goes on (a lost driver machine: no flush, no clean stop)
and started again with the same settings file. The new `up` must go on from the registry: its
first version warm-starts from the champion at the kill, every event published is trained on by
a served version (none pending, none never trained), and the app, deployed on its own, answers
throughout (failed requests counted).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from bench.freshness import (
    PLACES,
    breakdown,
    differences,
    mean_phases,
    model_freshness,
    pct,
    served_all,
    wait_for,
)
from harness.raycluster import SERVE, TRAIN, LocalCluster
from harness.s3server import S3Server
from services.demo import Clock, Queries
from services.loop_state import STATE_FILE, read_state
from services.settings import Settings, load_settings
from streams.admin import ensure_topics
from streams.broker import LocalBroker, free_port
from streams.buffer import EventBuffer
from streams.config import BrokerConfig, KafkaConfig, TopicsConfig
from streams.datasets import DEFAULT_ML100K, movielens_100k
from streams.events import Event
from streams.producer import replay
from streams.storage import StorageConfig

FIRST = 20_000
STREAMTUNE = str(Path(sys.executable).with_name("streamtune"))

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


def cluster_overrides(tmp: Path, kafka: KafkaConfig, topics: TopicsConfig, prefix: str,
                      opts: StorageConfig) -> dict[str, Any]:  # fmt: skip
    """A cluster user's settings file: where things are, nothing about how they behave."""
    store = opts.model_dump()
    return {
        "state_dir": str(tmp / "state"),
        "embedded_broker": False,
        "kafka": kafka.model_dump(),
        "topics": topics.model_dump(),
        "ingest": {"group_id": "bench-fresh-ingest"},
        "buffer": {"path": f"{prefix}/buffer", "storage": store},
        "registry": {"path": f"{prefix}/registry", "storage": store},
        "trainer": {"storage_path": f"{prefix}/ray", "storage": store, "node_resource": TRAIN},
        "loop": {"round_on_cluster": True},
        "serving": {"node_resource": SERVE},
        "rollout": {"in_cluster": True},
    }


class UpProcess:
    """`streamtune --config FILE up --address CLUSTER --no-serve`, a process of its own, and
    what the freshness accounting reads of it: the loop's round records (its state file) and the
    buffer (``loop.state()`` and ``buffer`` as on a ``services.runtime.Running``)."""

    def __init__(self, cluster: LocalCluster, config: Path, s: Settings, log: Path) -> None:
        self.cluster, self.config, self.s, self.log = cluster, config, s, log
        self.buffer = EventBuffer(s.buffer)
        self.loop = self
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        cmd = [STREAMTUNE, "--config", str(self.config), "up", "--address",
               self.cluster.address, "--no-serve"]  # fmt: skip
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(cmd, env=dict(os.environ, **self.cluster.env()),
                                         stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True)  # fmt: skip

    def ready(self, since: int = 0) -> bool:
        """Whether `up` said it is running (after byte ``since`` of its log)."""
        with self.log.open("rb") as f:
            f.seek(since)
            return b"streamtune up: ingest" in f.read()

    def state(self) -> dict[str, Any]:
        return read_state(self.s.state_dir / STATE_FILE)

    def kill(self) -> None:
        """SIGKILL, as a lost driver machine: no flush, no clean stop of anything."""
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.kill()


def kill_and_restart(up: UpProcess, queries: Queries, events: list[Event],
                     rate: float) -> dict[str, Any]:  # fmt: skip
    """SIGKILL `up` while the stream goes on, start it again; the new one must go on from the
    registry (next version, warm-started from the champion), train every event once more
    published, and the app (deployed on its own) must keep answering meanwhile."""
    s, registry = up.s, up.s.open_registry()
    failed_before = queries.failed
    clock = Clock()
    producer = threading.Thread(target=replay, args=(clock.stamp(events), s.kafka,
                                s.topics.events), kwargs={"rate": rate}, daemon=True)  # fmt: skip
    producer.start()
    time.sleep(5.0)  # rounds run back to back: the kill lands in one, or between two
    up.kill()
    killed_at, latest = time.time(), registry.latest() or 0
    champion = registry.champion()
    time.sleep(2.0)
    mark = up.log.stat().st_size
    up.start()
    restarted_at = time.time()
    wait_for(lambda: up.ready(since=mark), 300, "the restarted up to start")
    ready_s = time.time() - restarted_at
    wait_for(lambda: (registry.latest() or 0) > latest, 300, "a version by the restarted up")
    first = latest + 1
    back_s = time.time() - restarted_at
    producer.join()
    served = served_all(up, queries, clock, events, 180)
    m = model_freshness(up, queries, clock, events)
    arr = np.asarray(m["s"])
    records = {int(r["version"]): r for r in up.state()["rounds"] if "version" in r}
    recorded = set(records)
    phases = records.get(first, {}).get("phases", {})
    return {
        "events": len(events),
        "latest_at_kill": latest,
        "first_after_restart": first,
        "first_after_restart_parent": registry.meta(first).get("parent"),
        "champion_at_kill": champion,
        "restart_to_ready_s": round(ready_s, 1),
        "first_after_restart_s": {k: round(v, 2) for k, v in phases.items()},
        "restart_to_version_s": round(back_s, 1),
        "down_s": round(restarted_at - killed_at, 1),
        "all_served": served,
        "pending": m["pending"],
        "never_trained": m["never_trained"],
        "model_p50_s": pct(arr, 50),
        "model_max_s": pct(arr, 100),
        "failed_requests": queries.failed - failed_before,
        # Kept versions with no round record in the state file: a kill between a round's
        # registration and its record would leave its events counted as pending forever.
        "unrecorded_versions": sorted(set(registry.versions()) - recorded),
    }


def freshness_on_cluster(cluster: LocalCluster, s3: S3Server, tmp: Path, seconds: float,
                         rate: float) -> dict[str, Any]:  # fmt: skip
    from harness.cluster_settings import serve_env

    broker_cfg = BrokerConfig(port=free_port(), controller_port=free_port(),
                              state_dir=tmp / "kafka-fresh", heap="512m")  # fmt: skip
    broker = LocalBroker(broker_cfg)
    broker.up()
    up = queries = None
    try:
        kafka = KafkaConfig(bootstrap_servers=broker_cfg.bootstrap)
        topics = TopicsConfig(events="fresh.events", dead_letter="fresh.dlq")
        ensure_topics(kafka, topics)
        prefix = f"s3://bench/fresh-{uuid.uuid4().hex[:8]}"
        config = tmp / "streamtune.yaml"
        opts = StorageConfig(options=s3.options())
        config.write_text(yaml.safe_dump(cluster_overrides(tmp, kafka, topics, prefix, opts)))
        s = load_settings(config)
        events = movielens_100k(DEFAULT_ML100K)
        steady = events[FIRST : FIRST + int(seconds * rate)]
        after = events[FIRST + len(steady) : FIRST + len(steady) + int(30 * rate)]
        log = Path(tempfile.mkstemp(prefix="bench-cluster-up-", suffix=".log")[1])
        print(f"freshness: `up`'s output in {log}", flush=True)
        up = UpProcess(cluster, config, s, log)
        up.start()
        replay(Clock().stamp(events[:FIRST]), s.kafka, s.topics.events)
        print(f"freshness: first version on {FIRST:,} events", flush=True)
        registry = s.open_registry()
        wait_for(lambda: registry.champion() is not None, 900, "the first version")
        port = free_port()
        cluster.serve_deploy(port, serve_env(s, tmp))
        users = sorted({e.user_id for e in events[:FIRST]})
        queries = Queries(f"http://127.0.0.1:{port}", users, rps=20.0)
        queries.thread.start()
        wait_for(lambda: bool(queries.first_seen), 300, "the first version to be served")
        print(f"freshness: {len(steady):,} events at {rate:.0f}/s", flush=True)
        clock = Clock()
        replay(clock.stamp(steady), s.kafka, s.topics.events, rate=rate)
        if not served_all(up, queries, clock, steady, 120):
            print("freshness: the tail was not served by a covering version in 120 s")
        model = model_freshness(up, queries, clock, steady)
        rounds = [r for r in breakdown(up, queries) if r["version"] > 1]
        failed = queries.failed
        print(f"restart: `up` SIGKILLed and started again, {len(after):,} events", flush=True)
        restart = kill_and_restart(up, queries, after, rate)
        changed = differences(s, CLUSTER_PLACES)
    finally:
        if queries is not None:
            queries.stop.set()
        if up is not None:
            up.stop()
        broker.down()
    m = np.asarray(model["s"])
    p50, p99 = pct(m, 50), pct(m, 99)
    phases = ["read", "prepare", "train", "gate", "register", "rollout", "total"]
    return {
        "rate": rate,
        "model_p50_s": p50,
        "model_p99_s": p99,
        "model_samples": len(m),
        "model_pending": model["pending"],
        "model_never_trained": model["never_trained"],
        "rounds": len(rounds),
        "consolidation_rounds": sum(r["kind"] == "consolidation" for r in rounds),
        "round_breakdown_s": mean_phases(rounds, phases),
        "round_total_s": [round(r["total"], 2) for r in rounds],
        "failed_requests": failed,
        "restart": restart,
        "settings_changed": changed,
        "goals": {
            "model_p50_under_5s": p50 is not None and p50 <= 5,
            "model_p99_under_15s": p99 is not None and p99 <= 15,
            "none_pending": model["pending"] == 0,
            "none_never_trained": model["never_trained"] == 0,
            "restart_resumed": restart["first_after_restart_parent"] == restart["champion_at_kill"]
            and restart["all_served"]
            and restart["never_trained"] == 0,
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
    r = res["restart"]
    print(f"`up` SIGKILLed with v{r['latest_at_kill']} latest (champion v{r['champion_at_kill']}), "
          f"down {r['down_s']} s; the restarted one registered v{r['first_after_restart']} "
          f"(parent v{r['first_after_restart_parent']}) {r['restart_to_version_s']} s after its "
          f"start (ready after {r['restart_to_ready_s']} s); of {r['events']:,} events"
          f": {r['pending']} pending, {r['never_trained']} never "
          f"trained, model p50 {r['model_p50_s']} s, max {r['model_max_s']} s; "
          f"{r['failed_requests']} failed requests", flush=True)  # fmt: skip
