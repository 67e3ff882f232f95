"""Cluster mode end to end: S3, a 3-node Ray cluster, a steady stream, a worker node killed.

    python -m bench.cluster [--quick] [--freshness-only] [--rate R]

Starts the project's SeaweedFS S3 server, the embedded Kafka broker and a Ray cluster of a head
and two worker nodes (`ray start`, see ``harness/raycluster.py``). A producer publishes a steady
synthetic stream; ingest writes it to a buffer on S3; the continual loop runs rounds as tasks on
the worker nodes (``trainer.node_resource``), which train through the driver's long-lived Ray
Train run (its workers on the worker nodes too), with the registry and Ray Train's checkpoints on
S3. During the second round the worker node hosting a training worker is SIGKILLed; the round
must resume from its checkpoint and still register exactly one version, and the node is then
started again. After the stream ends,
every published event must be in the buffer exactly once. Finally the round-cost measurement of
``bench.round_cost`` runs on the same cluster and S3: the same 20,000 new events with 100k, 1M
and 5M events already buffered (``--quick``: 100k, 400k, 1M).

The driver runs what `up --address ... --no-serve` runs (``services.runtime.start``): ingest and
the loop, with the control plane (rollout controller, history actor) as detached actors on the
head. Once a champion exists the Serve app is deployed on its own (`serve deploy` of
deploy/serve.yaml) onto the worker nodes, and a client keeps querying it: each promoted version's
rollout is timed and its failed requests counted. At the end a version that fails every live
request is promoted; the controller must roll the app back (its failures are reported apart).

The parts above use trainer settings of their own (2 blocks, 4-epoch rounds, a checkpoint every
epoch) so that a node can be killed mid-round. Last, on a fresh cluster of the same shape,
`streamtune up --address ... --no-serve` runs as a process of its own with the defaults of every
setting but placement (``bench.cluster_freshness``): model freshness over 60 s of steady stream
(``--quick``; 120 s without), then `up` is SIGKILLed mid-stream and started again, and must go on
from the registry while the app keeps answering.
"""

from __future__ import annotations

import argparse
import json
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from bench.cluster_freshness import freshness_on_cluster, print_freshness
from bench.round_cost import measure
from harness.cluster_probes import checkpointed, train_worker_nodes
from harness.cluster_settings import cluster_settings, serve_env, training
from harness.liveclient import LiveClient, register_broken_copy
from harness.raycluster import SERVE, TRAIN, LocalCluster, Node, cluster_with_s3
from harness.s3server import S3Server
from services.loop import ContinualLoop
from services.running import Running
from services.runtime import start
from services.settings import Settings
from streams.admin import ensure_topics
from streams.broker import LocalBroker, free_port
from streams.config import BrokerConfig, KafkaConfig, TopicsConfig
from streams.datasets import DriftSpec, synthetic_drift
from streams.producer import replay
from streams.storage import StorageConfig
from training.registry import Registry
from training.round import RoundConfig, RoundResult

# The benchmark gates as the product does (the test promotes every round), in larger batches.
GATED: dict[str, Any] = {"batch_size": 64, "tolerance": 0.05}


def round_config(prefix: str, opts: StorageConfig, epochs: int) -> RoundConfig:
    return RoundConfig(**training(prefix, opts, epochs, epochs, **GATED))


def _kill_mid_round(cluster: LocalCluster, workers: list[Node], running: threading.Thread,
                    store: tuple[str, StorageConfig]) -> str:  # fmt: skip
    """Once the round has written its first checkpoint, SIGKILL the worker node hosting a
    training worker (so the recovery can resume from that checkpoint)."""
    before = checkpointed(*store)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and running.is_alive():
        if checkpointed(*store) <= before:
            time.sleep(0.3)
            continue
        hosting = train_worker_nodes()
        victim = next((w for w in workers if w.alive and w.node_id() in hosting), None)
        if victim is not None:
            node_id = victim.node_id() or ""
            cluster.kill(victim)
            return node_id
        time.sleep(0.5)
    raise RuntimeError("the round never started training on a worker node")


def _round_thread(loop: ContinualLoop) -> tuple[threading.Thread, dict[str, Any]]:
    out: dict[str, Any] = {}

    def run() -> None:
        out["r"] = loop.run_once()

    return threading.Thread(target=run), out


class _Rounds:
    """The rounds of ``stream_loop``, each timed in a thread of its own: the second loses a
    worker node mid-training (which then comes back), and once a champion exists the Serve app
    is deployed and each promoted version's rollout timed by a live client."""

    def __init__(self, cluster: LocalCluster, workers: list[Node], running: Running,
                 s: Settings, tmp: Path, prefix: str) -> None:  # fmt: skip
        self.cluster, self.workers, self.s, self.tmp = cluster, workers, s, tmp
        self.loop, self.registry = running.loop, running.registry
        self.store = (f"{prefix}/ray", s.trainer.storage)
        self.port = free_port()
        self.client: LiveClient | None = None
        self.results: list[tuple[RoundResult | None, float]] = []
        self.rollouts: list[dict[str, Any]] = []
        self.kill: dict[str, Any] = {}

    def run(self, producer: threading.Thread, per_round: int, wanted: int) -> None:
        """Rounds until ``wanted`` have run, or the stream has ended and nothing is left."""
        while len(self.results) < wanted:
            if self.loop.pending() < per_round and producer.is_alive():
                time.sleep(1.0)
                continue
            lose_node = len(self.results) == 1  # the second round loses a worker node
            r, seconds = self._round(lose_node)
            if lose_node:
                self._node_back(r, seconds)
            if r is None and not producer.is_alive() and self.loop.pending() == 0:
                break
            self.results.append((r, seconds))
            what = f"v{r.version}{' (promoted)' if r.promoted else ''}" if r else "nothing"
            print(f"round {len(self.results)}: {seconds:.1f}s -> {what}", flush=True)
            self._follow_serve(r)

    def _round(self, lose_node: bool) -> tuple[RoundResult | None, float]:
        runner, out = _round_thread(self.loop)
        t0 = time.monotonic()
        runner.start()
        if lose_node:  # mid-training
            self.kill["node"] = _kill_mid_round(self.cluster, self.workers, runner, self.store)
        runner.join()
        return out.get("r"), time.monotonic() - t0

    def _node_back(self, r: RoundResult | None, seconds: float) -> None:
        """What the kill did to the round; then the node comes back (a replacement machine
        joining the cluster)."""
        import ray

        kill, workers = self.kill, self.workers
        dead = {n["NodeID"] for n in ray.nodes() if not n["Alive"]}
        kill["confirmed_dead"] = kill["node"] in dead
        kill["round_registered"] = r is not None
        kill["resumed_start_epoch"] = (
            self.registry.meta(r.version)["metrics"].get("train_start_epoch") if r else None
        )
        kill["recover_s"] = round(seconds, 1)
        victim = next(w for w in workers if not w.alive)
        workers[workers.index(victim)] = self.cluster.add_worker(
            f"{victim.name}b", 3, {TRAIN: 1.0, SERVE: 1.0}
        )

    def _follow_serve(self, r: RoundResult | None) -> None:
        registry, client = self.registry, self.client
        champion = registry.champion()
        if client is None and champion is not None:
            # The Serve app, deployed on its own by another process, once a champion exists.
            self.cluster.serve_deploy(self.port, serve_env(self.s, self.tmp))
            items = registry.content(champion).vocab.items()[:5]
            self.client = LiveClient(f"http://127.0.0.1:{self.port}", items).__enter__()
            self.client.wait_for(champion, timeout=300)
        elif client is not None and r is not None and r.promoted:
            # From the promotion's commit to the first answer by the new version.
            t = max(d["ts"] for d in registry.decisions() if d["version"] == r.version)
            client.wait_for(r.version, timeout=300)
            time.sleep(2.0)  # and a little after
            first = min(at for at, _, v in client.results if v == r.version)
            self.rollouts.append({"version": r.version, "seconds": round(first - t, 2),
                                  "failed": client.failed(t, time.time())})  # fmt: skip

    def rollback(self) -> dict[str, Any]:
        """Promote a copy of the champion that fails every live request; the controller must
        roll the app back. Closes the client; empty if the app was never deployed."""
        registry, client = self.registry, self.client
        if client is None:
            return {}
        good = registry.champion()
        assert good is not None
        bad = register_broken_copy(registry, good)
        t = time.time()
        registry.set_champion(bad, "bench: fails every live request")
        while registry.champion() != good and time.time() - t < 300:
            time.sleep(0.5)
        rollback = {"bad": bad, "rolled_back": registry.champion() == good,
                    "detect_s": round(time.time() - t, 2)}  # fmt: skip
        rollback["serve_back_s"] = round(client.wait_for(good, timeout=300), 2)
        rollback["failed_while_bad"] = client.failed(t, time.time())
        client.__exit__()
        return rollback


def stream_loop(cluster: LocalCluster, workers: list[Node], s3: S3Server, tmp: Path,
                quick: bool) -> dict[str, Any]:  # fmt: skip
    events = list(synthetic_drift(DriftSpec(users=80, events=6_000 if quick else 15_000, seed=9)))
    rounds_wanted = 3 if quick else 4
    broker_cfg = BrokerConfig(port=free_port(), controller_port=free_port(),
                              state_dir=tmp / "kafka", heap="512m")  # fmt: skip
    broker = LocalBroker(broker_cfg)
    broker.up()
    running = None
    try:
        kafka = KafkaConfig(bootstrap_servers=broker_cfg.bootstrap)
        topics = TopicsConfig(events="bench.events", dead_letter="bench.dlq", partitions=4)
        ensure_topics(kafka, topics)
        prefix = f"s3://bench/cluster-{uuid.uuid4().hex[:8]}"
        opts = StorageConfig(options=s3.options())
        s = cluster_settings(tmp, kafka, topics, prefix, opts, min_round_events=300, watch_s=60,
                             **GATED)  # fmt: skip
        running = start(s, serve_http=False)  # ingest, the loop; the control plane in the cluster
        rate = len(events) / (40.0 if quick else 90.0)
        producer = threading.Thread(target=replay, args=(events, kafka, topics.events),
                                    kwargs={"rate": rate})  # fmt: skip
        producer.start()
        rounds = _Rounds(cluster, workers, running, s, tmp, prefix)
        rounds.run(producer, len(events) // rounds_wanted, rounds_wanted)
        rollback = rounds.rollback()
        producer.join()
        time.sleep(5.0)  # ingest drains what was published last
        running.stop(timeout=60)
        table = running.buffer.read(columns=["event_id"])
        ids = table["event_id"].to_pylist()
        published = {e.event_id for e in events}
        versions = Registry(f"{prefix}/registry", storage=s.registry.storage).versions()
        decisions = running.registry.decisions()
        results = rounds.results
        return {
            "events": len(events),
            "lost": len(published - set(ids)),
            "duplicated": len(ids) - len(set(ids)),
            "rounds": len(results),
            "versions": versions,
            "one_version_per_round": len(versions) == sum(1 for r, _ in results if r) + 1,
            "promoted": sum(1 for r, _ in results if r is not None and r.promoted),
            "rollbacks": sum(1 for d in decisions if d["decision"] == "rollback"),
            "rollouts": rounds.rollouts,
            "rollback": rollback,
            "round_s": [round(s, 1) for _, s in results],
            "node_kill": rounds.kill,
        }
    finally:
        if running is not None:
            running.stop(timeout=30)
        broker.down()


def _round_cost(s3: S3Server, root: Path, sizes: list[int]) -> list[dict[str, Any]]:
    opts = StorageConfig(options=s3.options())
    cost = []
    for i, size in enumerate([sizes[0], *sizes]):  # the first one warms the workers up
        tmp = root / f"cost-{i}"
        tmp.mkdir()
        cfg = round_config(f"s3://bench/cost-{i}", opts, 1)
        row = measure(size, 20_000, (f"s3://bench/cost-{i}/buffer", opts), tmp, 1, cfg)
        if i:
            cost.append(row)
            print(f"{size:>10,} buffered: round {row['round_s']:.1f}s "
                  f"(train {row['train_s']:.1f}s)", flush=True)  # fmt: skip
    return cost


def _summary(loop_result: dict[str, Any], cost: list[dict[str, Any]]) -> dict[str, Any]:
    kill = loop_result["node_kill"]
    recovered = bool(kill.get("confirmed_dead") and kill.get("round_registered"))
    return {
        "promoted": loop_result["promoted"],
        "rollbacks": loop_result["rollbacks"],
        # Requests that failed while the app rolled forward to a promoted version (the broken
        # version's own failures are what trigger its rollback: reported apart).
        "failed_requests": sum(r["failed"] for r in loop_result["rollouts"]),
        "rollouts": loop_result["rollouts"],
        "rollback": loop_result["rollback"],
        "node_kill_recovered": recovered and loop_result["one_version_per_round"],
        "node_kill_recover_s": kill.get("recover_s"),
        "node_kill_resumed_start_epoch": kill.get("resumed_start_epoch"),
        "lost": loop_result["lost"],
        "duplicated": loop_result["duplicated"],
        "versions": loop_result["versions"],
        "round_s": loop_result["round_s"],
        "round_s_by_buffered": {str(r["buffered"]): round(r["round_s"], 2) for r in cost},
        "round_cost_growth": round(cost[-1]["round_s"] / cost[0]["round_s"], 3),
        # The same examples train in every row: growth in train_s is the machine, not the data
        # path; the rest (plan, segment read, history lookup, gate, registration) is the data.
        "train_s_by_buffered": {str(r["buffered"]): round(r["train_s"], 2) for r in cost},
        "rest_s_by_buffered": {
            str(r["buffered"]): round(r["round_s"] - r["train_s"], 2) for r in cost
        },
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="a shorter stream; 100k/400k/1M")
    ap.add_argument("--freshness-only", action="store_true",
                    help="only the freshness part (its own cluster, up's defaults)")  # fmt: skip
    ap.add_argument("--rate", type=float, default=100.0, help="events/s of the freshness part")
    args = ap.parse_args()
    sizes = [100_000, 400_000, 1_000_000] if args.quick else [100_000, 1_000_000, 5_000_000]
    summary: dict[str, Any] = {"bench": "cluster", "nodes": 3, "storage": "s3"}
    if not args.freshness_only:
        with cluster_with_s3() as (cluster, workers, s3, root):
            loop_result = stream_loop(cluster, workers, s3, root, args.quick)
            cost = _round_cost(s3, root, sizes)
        summary.update(_summary(loop_result, cost))
    with cluster_with_s3() as (cluster, _, s3, root):  # a cluster of its own: its control plane too
        fresh = freshness_on_cluster(cluster, s3, root, 60.0 if args.quick else 120.0, args.rate)
    print_freshness(fresh)
    summary["freshness"] = fresh
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
