"""Shared fixtures. One real Kafka broker (KRaft, from Maven jars) and, for the tests that use
object storage, one real S3 server (SeaweedFS) serve the whole test run."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from streams.broker import LocalBroker, free_port
from streams.config import BrokerConfig, KafkaConfig, TopicsConfig
from streams.s3server import S3Server
from streams.storage import StorageConfig


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


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """One real S3-compatible server (SeaweedFS, built once into ~/.cache) for the test run."""
    with S3Server(tmp_path_factory.mktemp("s3")) as server:
        server.create_bucket("streamtune-test")
        yield server


@pytest.fixture
def s3_location(s3_server: S3Server) -> tuple[str, StorageConfig]:
    """A fresh prefix in the test bucket, and the options that reach it."""
    uri = f"s3://streamtune-test/{uuid.uuid4().hex[:12]}"
    return uri, StorageConfig(options=s3_server.options())
