"""Shared fixtures. One real Kafka broker (KRaft, from Maven jars) and, for the tests that use
object storage, one real S3 server (SeaweedFS) serve the whole test run."""

from __future__ import annotations

import os
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

# A Ray call after ``ray.shutdown`` (a thread left running) would otherwise start a new local Ray
# session in the test process, which Ray later ends whole; with this it raises where it happens.
os.environ["RAY_ENABLE_AUTO_CONNECT"] = "0"

from harness import loopback
from harness.s3server import S3Server
from streams.broker import LocalBroker, free_port
from streams.config import BrokerConfig, KafkaConfig, TopicsConfig
from streams.storage import StorageConfig

# Every Ray the tests start (in this process or another) binds and announces 127.0.0.1.
loopback.keep()


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


@pytest.fixture(autouse=True, scope="module")
def no_ray_left_behind() -> Iterator[None]:
    """Every module shuts down the Ray it started, with no thread of it still calling Ray."""
    yield
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()
        pytest.fail("the module left Ray initialised")
    busy = [t.name for t in threading.enumerate() if t.name == "serve-deploy" and t.is_alive()]
    if busy:
        pytest.fail(f"threads still deploying after the module: {busy}")
