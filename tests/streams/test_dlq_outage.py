"""Nothing is lost through the dead-letter path: a DLQ that refuses writes stops the commits.

The outage is real: the dead-letter topic is created with ``max.message.bytes`` too small for any
record, so the broker refuses every dead letter (MESSAGE_TOO_LARGE); raising the limit with an
admin call ends the outage.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from pathlib import Path

import pyarrow.compute as pc
import pytest
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer
from kafka.admin import ConfigResource, ConfigResourceType, NewTopic

from streams.admin import end_offsets
from streams.buffer import EventBuffer
from streams.config import BufferConfig, IngestConfig, KafkaConfig, TopicsConfig
from streams.datasets import DriftSpec, synthetic_drift
from streams.ingest import Ingestor

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def wait_for(cond: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():  # type: ignore[operator]
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def read_dead_letters(kafka: KafkaConfig, topic: str) -> list[tuple[int, int, str]]:
    consumer = KafkaConsumer(
        topic,
        bootstrap_servers=kafka.bootstrap_servers,
        auto_offset_reset="earliest",
        consumer_timeout_ms=4000,
        group_id=f"check-{uuid.uuid4().hex}",
    )
    try:
        out = []
        for m in consumer:
            h = {k: v.decode() for k, v in m.headers}
            out.append((int(h["source_partition"]), int(h["source_offset"]), h["reason"]))
        return out
    finally:
        consumer.close()


def test_dlq_outage_commits_nothing_and_loses_nothing(
    kafka: KafkaConfig, topics: TopicsConfig, tmp_path: Path
) -> None:
    admin = KafkaAdminClient(bootstrap_servers=kafka.bootstrap_servers)
    admin.create_topics(
        [
            NewTopic(topics.events, topics.partitions, 1),
            # No record fits: every dead letter is refused by the broker.
            NewTopic(topics.dead_letter, 1, 1, topic_configs={"max.message.bytes": "16"}),
        ]
    )
    good = list(synthetic_drift(DriftSpec(events=600, seed=5)))
    prod = KafkaProducer(bootstrap_servers=kafka.bootstrap_servers)
    poison: list[tuple[int, int]] = []
    for i, e in enumerate(good):
        prod.send(topics.events, key=e.key(), value=e.encode())
        if i % 50 == 0:
            payload = json.dumps({"event_id": f"bad-{i}", "event_type": "teleport"}).encode()
            meta = prod.send(topics.events, key=e.key(), value=payload).get(timeout=30)
            poison.append((meta.partition, meta.offset))
    prod.flush()
    prod.close()
    total = len(good) + len(poison)

    buf = EventBuffer(BufferConfig(path=tmp_path / "buf"))
    cfg = IngestConfig(
        group_id=f"g-{topics.events}",
        flush_interval_s=0.3,
        max_poll_records=100,
        dead_letter_timeout_s=5.0,
        retry_initial_s=0.2,
        retry_max_s=1.0,
    )
    ing = Ingestor(kafka, topics, cfg, buf)
    runner = threading.Thread(target=ing.run, daemon=True)
    runner.start()
    try:
        # The outage: flushes fail again and again...
        wait_for(lambda: ing.stats.dead_letter_failures >= 3, 90, "failed DLQ flushes")
        time.sleep(2.0)
        assert ing.stats.dead_letter_total == 0
        assert "refused" in ing.stats.last_error or "acknowledge" in ing.stats.last_error
        # ...and no poison offset, nor anything after it in its partition, counts as consumed.
        resume = {p: o for (_, p), o in buf.next_offsets().items()}
        first_poison: dict[int, int] = {}
        for p, o in poison:
            first_poison[p] = min(first_poison.get(p, o), o)
        for p, o in first_poison.items():
            assert resume.get(p, 0) <= o, f"partition {p}: resume {resume.get(p)} > poison {o}"
        assert read_dead_letters(kafka, topics.dead_letter) == []

        # The DLQ recovers: everything lands, nothing twice.
        admin.alter_configs(
            [
                ConfigResource(
                    ConfigResourceType.TOPIC,
                    topics.dead_letter,
                    configs={"max.message.bytes": "1048576"},
                )
            ]
        )
        wait_for(lambda: sum(buf.watermark().values()) == total, 120, "ingest to catch up")
    finally:
        ing.stop()
        runner.join(timeout=60)
        admin.close()
    assert not runner.is_alive()

    dead = read_dead_letters(kafka, topics.dead_letter)
    assert {(p, o) for p, o, _ in dead} == set(poison)  # each poison record at least once
    assert {r for _, _, r in dead} == {"schema"}
    assert ing.stats.dead_letter_total == len(poison)
    table = buf.read()
    ids = table["event_id"].to_pylist()
    assert len(ids) == len(set(ids)) and set(ids) == {e.event_id for e in good}
    ends = end_offsets(kafka, topics.events)
    assert buf.watermark() == {f"{topics.events}:{p}": n for p, n in ends.items() if n}
    for p, n in ends.items():  # every offset is a row or a dead letter, exactly once in the buffer
        offs = table.filter(pc.equal(table["partition"], p))["offset"].to_pylist()
        assert sorted(offs + [o for q, o in poison if q == p]) == list(range(n))
