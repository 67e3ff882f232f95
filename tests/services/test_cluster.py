"""Cluster mode on a real multi-node Ray cluster: rounds on worker nodes, state on S3, a lost node.

A head and two worker nodes started with `ray start` (separate process groups, their own
resources, temp dirs and ports), the project's SeaweedFS S3 server and the real broker. Events
go Kafka -> ingest -> buffer on S3; each round is planned by this driver (segment names and
offsets only) and runs as a Ray task on a worker node (``trainer.node_resource``), which reads
its segments from S3, trains with Ray Train + DeepSpeed (checkpoints on S3) and registers in the
registry on S3. Mid-round a worker node hosting a training worker is SIGKILLed; the round must
still register exactly one version for its slice.

This module runs in a pytest process of its own (see the Makefile): its driver joins an
external cluster, which an earlier in-process `ray.init` would prevent.
"""

from __future__ import annotations

import shutil
import tempfile
import threading
import time
import uuid
from pathlib import Path

import pytest
import ray

from bench.raycluster import LocalCluster, Node
from services.config import LoopConfig
from services.loop import ContinualLoop
from streams.admin import ensure_topics
from streams.buffer import EventBuffer
from streams.config import BufferConfig, IngestConfig, KafkaConfig, TopicsConfig
from streams.datasets import DriftSpec, synthetic_drift
from streams.ingest import Ingestor
from streams.producer import replay
from streams.s3server import S3Server
from streams.storage import StorageConfig
from training.config import GateConfig, ModelConfig, ReplayConfig, TrainerConfig
from training.registry import Registry
from training.round import RoundConfig

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TRAIN = "streamtune_train"


def _ingest(kafka: KafkaConfig, topics: TopicsConfig, buffer: EventBuffer) -> None:
    cfg = IngestConfig(group_id=f"g-{topics.events}", idle_exit_s=3.0)
    Ingestor(kafka, topics, cfg, buffer).run()


def _train_worker_nodes() -> set[str]:
    from ray.util.state import list_actors

    alive = list_actors(filters=[("state", "=", "ALIVE")], limit=1000)
    return {a.node_id for a in alive if "RayTrainWorker" in (a.class_name or "")}


def _round_task_nodes() -> set[str]:
    from ray.util.state import list_tasks

    running = list_tasks(filters=[("state", "=", "RUNNING")], limit=1000)
    return {t.node_id for t in running if t.name and "run_planned" in t.name and t.node_id}


def test_rounds_on_worker_nodes_with_state_on_s3_survive_a_lost_node(
    kafka: KafkaConfig, topics: TopicsConfig, s3_server: S3Server, tmp_path: Path
) -> None:
    ensure_topics(kafka, topics)
    prefix = f"s3://streamtune-test/cluster-{uuid.uuid4().hex[:8]}"
    opts = StorageConfig(options=s3_server.options())
    cfg = RoundConfig(
        model=ModelConfig(max_len=20, d_model=32, text_init=False),
        trainer=TrainerConfig(
            num_workers=2,
            epochs=4,
            first_round_epochs=2,
            batch_size=32,
            lr=5e-3,
            storage_path=f"{prefix}/ray",
            storage=opts,
            max_failures=3,
            node_resource=TRAIN,
        ),
        replay=ReplayConfig(capacity=2000, ratio=1.0),
        gate=GateConfig(min_eval_users=10, tolerance=1.0),
    )
    events = list(synthetic_drift(DriftSpec(users=60, events=9000, seed=5)))
    # Under /tmp directly: Ray's socket paths below a pytest tmp_path exceed 107 bytes.
    root = Path(tempfile.mkdtemp(prefix="st-ray-", dir="/tmp"))
    with LocalCluster(root) as cluster:
        cluster.start_head()
        workers = [cluster.add_worker(f"w{i}", 2, {TRAIN: 1.0}) for i in (1, 2)]
        ray.init(address=cluster.address, log_to_driver=False)
        try:
            head_id = cluster.nodes[0].node_id()
            buffer = EventBuffer(BufferConfig(path=f"{prefix}/buffer", storage=opts))
            registry = Registry(f"{prefix}/registry", storage=opts)
            loop_cfg = LoopConfig(min_round_events=200, round_on_cluster=True)
            loop = ContinualLoop(buffer, registry, cfg, loop_cfg, tmp_path / "loop.json")

            replay(events[:6000], kafka, topics.events)
            _ingest(kafka, topics, buffer)
            first = loop.run_once()
            assert first is not None and first.version == 1
            rec = loop.state()["rounds"][-1]
            worker_ids = {w.node_id() for w in workers}
            assert rec["node"] in worker_ids and rec["node"] != head_id  # ran on a worker node
            assert rec["segments"] >= 1  # the driver handed over segment names, not rows

            replay(events[6000:], kafka, topics.events)
            _ingest(kafka, topics, buffer)
            out: dict[str, object] = {}
            runner = threading.Thread(target=lambda: out.update(r=loop.run_once()))
            runner.start()
            deadline = time.monotonic() + 300
            victim: Node | None = None
            while victim is None and time.monotonic() < deadline and runner.is_alive():
                hosting = _train_worker_nodes()
                if hosting:
                    # Prefer a node that hosts a training worker but not the round's task.
                    spare = hosting - _round_task_nodes()
                    pick = next(iter(spare or hosting))
                    victim = next((w for w in workers if w.node_id() == pick), None)
                time.sleep(0.5)
            assert victim is not None, "no training worker came up on a worker node"
            killed_id = victim.node_id()
            cluster.kill(victim)
            runner.join(timeout=900)
            assert not runner.is_alive(), "the round did not finish after the node was lost"
            # The fault happened: Ray itself declares that node dead.
            dead = {n["NodeID"] for n in ray.nodes() if not n["Alive"]}
            assert killed_id in dead
            second = out.get("r")
            assert second is not None, f"the round was not registered: {loop.last_skip}"
            fresh = Registry(f"{prefix}/registry", storage=opts)
            assert fresh.versions() == [1, 2]  # exactly one version per slice
            assert fresh.meta(2)["watermark"] == buffer.watermark()
            # It finished on a node that is still up (the task moved if its node was the victim).
            assert loop.state()["rounds"][-1]["node"] != killed_id
        finally:
            ray.shutdown()
    shutil.rmtree(root, ignore_errors=True)
