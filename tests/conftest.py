"""Shared fixtures. One real Kafka broker (KRaft, from Maven jars) serves the whole test run."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from streams.broker import LocalBroker, free_port
from streams.config import BrokerConfig, KafkaConfig, TopicsConfig


@pytest.fixture(scope="session")
def kafka_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrokerConfig]:
    cfg = BrokerConfig(
        port=free_port(),
        controller_port=free_port(),
        state_dir=tmp_path_factory.mktemp("kafka"),
        heap="512m",
    )
    broker = LocalBroker(cfg)
    broker.up()
    try:
        yield cfg
    finally:
        broker.down()


@pytest.fixture(scope="session")
def kafka(kafka_broker: BrokerConfig) -> KafkaConfig:
    return KafkaConfig(bootstrap_servers=kafka_broker.bootstrap)


@pytest.fixture
def topics() -> TopicsConfig:
    """Fresh, uniquely named topics for each test (the broker is shared)."""
    name = f"t-{uuid.uuid4().hex[:8]}"
    return TopicsConfig(events=f"{name}.events", dead_letter=f"{name}.dlq", partitions=4)


@pytest.fixture
def repo_root() -> Path:
    return Path(__file__).resolve().parent.parent
