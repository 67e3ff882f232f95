"""The live rollout stack the rollout tests share: a registry with one version, a real Ray Serve
app on it, the serving context and its history shards on a real Kafka topic (``live``, one per
module), and ``Live.controller`` for a rollout controller with the settings a test needs."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import ray
from ray import serve

from serving.config import RolloutConfig, ServingConfig
from serving.context import start_context
from serving.rollout import RolloutController, RolloutEvent
from streams.admin import ensure_topics
from streams.broker import free_port
from streams.config import KafkaConfig, TopicsConfig
from tests.serving.test_serving_live import add_version
from training.registry import Registry

LOOSE: dict[str, Any] = {"watch_s": 300, "min_requests": 10, "max_p99_ms": 5000}


class Live:
    def __init__(self, reg: Registry, cfg: ServingConfig, ctx: Any, url: str) -> None:
        self.reg, self.cfg, self.ctx, self.url = reg, cfg, ctx, url
        self.events: list[RolloutEvent] = []
        self.controllers: list[RolloutController] = []

    def controller(self, **rollout: Any) -> RolloutController:
        ctl = RolloutController(
            self.reg, self.cfg, RolloutConfig(**rollout), self.ctx, on_event=self.events.append
        )
        self.controllers.append(ctl)
        return ctl


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory, kafka: KafkaConfig) -> Iterator[Live]:
    name = f"rollback-{uuid.uuid4().hex[:6]}"
    topics = TopicsConfig(events=f"{name}.events", dead_letter=f"{name}.dlq", partitions=2)
    ensure_topics(kafka, topics)
    reg = Registry(tmp_path_factory.mktemp("registry"))
    v1 = add_version(reg, 1)
    reg.set_champion(v1, "first")
    port = free_port()
    cfg = ServingConfig(port=port, replicas=2)
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    ctx = start_context(kafka, topics, None, cfg)
    st = Live(reg, cfg, ctx, f"http://127.0.0.1:{port}")
    st.kafka, st.topics = kafka, topics  # type: ignore[attr-defined]
    ev = st.controller(**LOOSE).step()
    assert ev is not None and ev.kind == "rollout" and ev.version == v1
    yield st
    assert all(ctl.close() for ctl in st.controllers), "a serve.run outlived the tests"
    serve.shutdown()
    ray.shutdown()


def drive(ctl: RolloutController, until: object, timeout: float, every: float = 0.5) -> None:
    deadline = time.time() + timeout
    while not until() and time.time() < deadline:  # type: ignore[operator]
        time.sleep(every)
        ctl.step()
