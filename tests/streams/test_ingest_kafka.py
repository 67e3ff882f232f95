"""Exactly-once ingest against a real Apache Kafka broker (no mocks): the spine's must-shows."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pyarrow.compute as pc
import pytest
from kafka import KafkaConsumer, KafkaProducer

from streams.admin import ensure_topics
from streams.buffer import EventBuffer
from streams.config import BufferConfig, IngestConfig, KafkaConfig, TopicsConfig
from streams.datasets import DEFAULT_ML100K, DriftSpec, movielens_100k, synthetic_drift
from streams.ingest import Ingestor
from streams.producer import replay

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def ingest_once(
    kafka: KafkaConfig, topics: TopicsConfig, buf: EventBuffer, idle: float = 3.0, **kw: object
) -> Ingestor:
    cfg = IngestConfig(group_id=f"g-{topics.events}", idle_exit_s=idle, **kw)  # type: ignore[arg-type]
    ing = Ingestor(kafka, topics, cfg, buf)
    ing.run()
    return ing


def assert_exactly_once(buf: EventBuffer, expected_ids: set[str], topic: str) -> None:
    table = buf.read()
    ids = table["event_id"].to_pylist()
    assert len(ids) == len(set(ids)), f"{len(ids) - len(set(ids))} duplicated events"
    assert set(ids) == expected_ids, (
        f"lost {len(expected_ids - set(ids))}, extra {len(set(ids) - expected_ids)}"
    )
    # By position too: every (partition, offset) exactly once and contiguous from 0.
    for p in sorted(set(table["partition"].to_pylist())):
        offs = sorted(table.filter(pc.equal(table["partition"], p))["offset"].to_pylist())
        assert offs == list(range(len(offs))), f"partition {p} has gaps or repeats"
        assert buf.watermark()[f"{topic}:{p}"] == len(offs)


def test_movielens_round_trip(kafka: KafkaConfig, topics: TopicsConfig, tmp_path: Path) -> None:
    ensure_topics(kafka, topics)
    events = movielens_100k(DEFAULT_ML100K)
    assert replay(events, kafka, topics.events) == 100_000
    buf = EventBuffer(BufferConfig(path=tmp_path / "buf"))
    ing = ingest_once(kafka, topics, buf)
    assert ing.stats.ingested == 100_000 and ing.stats.dead_letter_total == 0
    assert_exactly_once(buf, {e.event_id for e in events}, topics.events)
    # Per user, the buffer keeps Kafka's order, which is timestamp order (keyed by user).
    table = buf.read()
    for user in ("1", "405", "655"):
        rows = table.filter(pc.equal(table["user_id"], user))
        by_offset = sorted(zip(rows["offset"].to_pylist(), rows["ts"].to_pylist(), strict=True))
        assert [ts for _, ts in by_offset] == sorted(ts for _, ts in by_offset)


def _ingest_subprocess(
    kafka: KafkaConfig,
    topics: TopicsConfig,
    buf_cfg: BufferConfig,
    logs: Path,
    **extra: str,
) -> subprocess.Popen[bytes]:
    env = dict(
        os.environ,
        STREAMTUNE_EMBEDDED_BROKER="false",
        STREAMTUNE_KAFKA__BOOTSTRAP_SERVERS=kafka.bootstrap_servers,
        STREAMTUNE_TOPICS__EVENTS=topics.events,
        STREAMTUNE_TOPICS__DEAD_LETTER=topics.dead_letter,
        STREAMTUNE_BUFFER__PATH=str(buf_cfg.path),
        STREAMTUNE_BUFFER__STORAGE__OPTIONS=json.dumps(buf_cfg.storage.options),
        STREAMTUNE_INGEST__GROUP_ID=f"g-{topics.events}",
        **extra,
    )
    cmd = [sys.executable, "-m", "services.cli", "ingest", "--segment-rows", "400",
           "--flush-interval", "0.2"]  # fmt: skip
    log = logs / f"ingest-{time.time_ns()}.log"
    return subprocess.Popen(
        cmd,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=log.open("wb"),
        start_new_session=True,
    )


def _logs(logs: Path) -> str:
    """The ingest processes' stderr, to explain a failure."""
    tails = [p.read_text(errors="replace")[-3000:] for p in logs.glob("ingest-*.log")]
    return "\n---\n".join(tails)


@pytest.fixture(params=["local", "s3"])
def buffer_cfg(request: pytest.FixtureRequest, tmp_path: Path) -> BufferConfig:
    """The buffer on a local path, and on a real S3 server (SeaweedFS) through the same code."""
    if request.param == "local":
        return BufferConfig(path=tmp_path / "buf")
    uri, storage = request.getfixturevalue("s3_location")
    return BufferConfig(path=uri, storage=storage)


def test_kill_9_at_random_moments_loses_and_duplicates_nothing(
    kafka: KafkaConfig, topics: TopicsConfig, tmp_path: Path, buffer_cfg: BufferConfig
) -> None:
    ensure_topics(kafka, topics)
    events = list(synthetic_drift(DriftSpec(events=50_000, seed=7)))
    producer = threading.Thread(
        target=replay, args=(events, kafka, topics.events), kwargs={"rate": 2_000.0}
    )
    producer.start()
    rng = random.Random(1234)
    kills = 0
    rows_seen = [0]

    def rows() -> int:
        return EventBuffer(buffer_cfg).stats().rows

    while producer.is_alive() or kills < 12:
        # Static membership: the restarted member resumes without waiting out a session timeout.
        proc = _ingest_subprocess(
            kafka,
            topics,
            buffer_cfg,
            tmp_path,
            STREAMTUNE_INGEST__INSTANCE_ID="ingest-0",
            STREAMTUNE_INGEST__MAX_POLL_RECORDS="300",
        )
        # Kill while data flows: once this process has written something (or after 8 s),
        # at a random moment in the next second - mid-poll, mid-write, mid-commit.
        deadline = time.monotonic() + 8.0
        while rows() == rows_seen[-1] and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 1.0))
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        kills += 1
        rows_seen.append(rows())
    producer.join()
    assert kills >= 12
    # Most kills landed while data was flowing, not before the first segment or after the end.
    assert len(set(rows_seen)) >= 6, rows_seen
    buf = EventBuffer(buffer_cfg)
    ingest_once(kafka, topics, buf)
    assert_exactly_once(buf, {e.event_id for e in events}, topics.events)


def test_poison_messages_are_dead_lettered_and_never_fatal(
    kafka: KafkaConfig, topics: TopicsConfig, tmp_path: Path
) -> None:
    ensure_topics(kafka, topics)
    good = list(synthetic_drift(DriftSpec(events=300, seed=3)))
    valid = json.loads(good[0].encode())
    bad: list[tuple[str, bytes | None]] = [
        ("undecodable", b"\xff\xfe\x00\x81 not utf8"),
        ("undecodable", b'{"event_id": "x", '),
        ("schema", json.dumps({**valid, "event_type": "teleport"}).encode()),
        ("schema", json.dumps({**valid, "ts": "yesterday"}).encode()),
        ("schema", json.dumps({k: v for k, v in valid.items() if k != "user_id"}).encode()),
        ("schema", b"42"),
        ("oversized", json.dumps({**valid, "context": {"blob": "x" * 200_000}}).encode()),
        ("empty", None),
    ]
    prod = KafkaProducer(bootstrap_servers=kafka.bootstrap_servers, max_request_size=8 << 20)
    sent_bad = []
    for i, e in enumerate(good):
        prod.send(topics.events, key=e.key(), value=e.encode())
        if i % 37 == 0:
            reason, payload = bad[(i // 37) % len(bad)]
            meta = prod.send(topics.events, key=e.key(), value=payload).get(timeout=30)
            sent_bad.append((reason, meta.partition, meta.offset))
    prod.flush()
    prod.close()
    buf = EventBuffer(BufferConfig(path=tmp_path / "buf"))
    ing = ingest_once(kafka, topics, buf)

    assert {e.event_id for e in good} == set(buf.read()["event_id"].to_pylist())
    assert ing.stats.dead_letter_total == len(sent_bad)
    consumer = KafkaConsumer(
        topics.dead_letter,
        bootstrap_servers=kafka.bootstrap_servers,
        auto_offset_reset="earliest",
        consumer_timeout_ms=5000,
        group_id=f"check-{uuid.uuid4().hex}",
    )
    dead = []
    for m in consumer:
        h = {k: v.decode() for k, v in m.headers}
        dead.append((h["reason"], int(h["source_partition"]), int(h["source_offset"])))
        assert h["detail"] and h["source_topic"] == topics.events
    consumer.close()
    assert sorted(dead) == sorted(sent_bad)
    # Their offsets count as consumed: the watermark covers every record in the topic.
    assert sum(buf.watermark().values()) == len(good) + len(sent_bad)


def test_two_consumers_split_partitions_exactly_once(
    kafka: KafkaConfig, topics: TopicsConfig, tmp_path: Path
) -> None:
    ensure_topics(kafka, topics)
    events = list(synthetic_drift(DriftSpec(events=36_000, seed=11)))
    buf_cfg = BufferConfig(path=tmp_path / "buf")
    env = {"STREAMTUNE_INGEST__IDLE_EXIT_S": "8"}
    a = _ingest_subprocess(kafka, topics, buf_cfg, tmp_path, **env)
    producer = threading.Thread(
        target=replay, args=(events, kafka, topics.events), kwargs={"rate": 3_000.0}
    )
    producer.start()
    # The second member joins while the first is consuming: a real rebalance mid-stream.
    time.sleep(2.0)
    b = _ingest_subprocess(kafka, topics, buf_cfg, tmp_path, **env)
    producer.join()
    codes = (a.wait(timeout=120), b.wait(timeout=120))
    assert codes == (0, 0), _logs(tmp_path)
    buf = EventBuffer(buf_cfg)
    per_writer: dict[str, int] = {}
    for seg in buf.segments():
        per_writer[seg.writer] = per_writer.get(seg.writer, 0) + seg.rows
    assert len(per_writer) == 2, per_writer
    # After the rebalance each member owned a share of the partitions.
    assert min(per_writer.values()) > 0.1 * len(events), per_writer
    assert_exactly_once(buf, {e.event_id for e in events}, topics.events)
