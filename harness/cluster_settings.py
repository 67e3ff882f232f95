"""The settings cluster mode runs with on the local cluster: the cluster test's and
``bench.cluster``'s, one definition.

What `up --address ... --no-serve` runs with there: rounds as tasks on the worker nodes
(``TRAIN``) through the driver's long-lived Ray Train run, replicas on the worker nodes
(``SERVE``), the control plane in the cluster, buffer, registry and checkpoints under ``prefix``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from harness.raycluster import SERVE, TRAIN
from harness.rounds import small_round
from services.config import LoopConfig
from services.settings import Settings
from serving.config import RolloutConfig, ServingConfig
from streams.config import BufferConfig, IngestConfig, KafkaConfig, TopicsConfig
from streams.storage import StorageConfig
from training.config import RegistryConfig


def training(prefix: str, opts: StorageConfig, epochs: int, first_round_epochs: int,
             batch_size: int = 32, tolerance: float = 1.0) -> dict[str, Any]:  # fmt: skip
    """Model, trainer, replay and gate of ``harness.rounds.small_round`` (a small model whose
    rounds a node kill can land in), training on the worker nodes with checkpoints on S3."""
    r = small_round(
        f"{prefix}/ray", epochs, first_round_epochs=first_round_epochs, batch_size=batch_size,
        tolerance=tolerance, storage=opts, max_failures=3, node_resource=TRAIN,
        # A checkpoint at every epoch but a round's last: the node is killed once the round
        # has its first one, and with the default cadence (2 s of training) that came so
        # late in these short epochs that the round could finish before the kill took hold.
        checkpoint_every_s=0.0,
    )  # fmt: skip
    return {"model": r.model, "trainer": r.trainer, "replay": r.replay, "gate": r.gate}


def cluster_settings(tmp: Path, kafka: KafkaConfig, topics: TopicsConfig, prefix: str,
                     opts: StorageConfig, *, batch_size: int = 32, tolerance: float = 1.0,
                     min_round_events: int = 200, watch_s: float = 120.0) -> Settings:  # fmt: skip
    """``tolerance`` 1.0 promotes every round (what the test's rollouts need); the benchmark
    gates as the product does."""
    return Settings(
        state_dir=tmp / "state",
        embedded_broker=False,
        kafka=kafka,
        topics=topics,
        buffer=BufferConfig(path=f"{prefix}/buffer", storage=opts),
        registry=RegistryConfig(path=f"{prefix}/registry", storage=opts),
        ingest=IngestConfig(group_id=f"g-{topics.events}"),
        loop=LoopConfig(
            min_round_events=min_round_events, round_on_cluster=True, long_lived_trainer=True
        ),
        serving=ServingConfig(replicas=2, node_resource=SERVE, follow_s=0.5),
        rollout=RolloutConfig(
            in_cluster=True,
            poll_s=0.5,
            watch_s=watch_s,
            min_requests=10,
            max_p99_ms=10_000,
            converge_timeout_s=90,
        ),
        # Warm rounds of 4 epochs: with 2, the round's last checkpoint was often registered by
        # the time the node died, so the retried group had nothing left to train (and the
        # result kept the first attempt's start epoch, 0: a resume that looked like a restart).
        **training(prefix, opts, 4, 2, batch_size, tolerance),
    )


def serve_env(s: Settings, tmp: Path) -> dict[str, str]:
    """The app's settings for `serve deploy` (what a RayService's env carries)."""
    return {
        "STREAMTUNE_STATE_DIR": str(tmp / "serve-state"),
        "STREAMTUNE_EMBEDDED_BROKER": "false",
        "STREAMTUNE_KAFKA__BOOTSTRAP_SERVERS": s.kafka.bootstrap_servers,
        "STREAMTUNE_TOPICS__EVENTS": s.topics.events,
        "STREAMTUNE_BUFFER__PATH": str(s.buffer.path),
        "STREAMTUNE_BUFFER__STORAGE__OPTIONS": json.dumps(s.buffer.storage.options),
        "STREAMTUNE_REGISTRY__PATH": str(s.registry.path),
        "STREAMTUNE_REGISTRY__STORAGE__OPTIONS": json.dumps(s.registry.storage.options),
        "STREAMTUNE_SERVING__REPLICAS": str(s.serving.replicas),
        "STREAMTUNE_SERVING__NODE_RESOURCE": SERVE,
        "STREAMTUNE_SERVING__FOLLOW_S": str(s.serving.follow_s),
    }
