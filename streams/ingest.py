"""Exactly-once ingest: a Kafka consumer-group member that appends validated events to the buffer.

Exactly once, by construction:
  * records are held in memory until a segment holding them (and the offset ranges they came
    from) is durably in the buffer; only then are offsets committed to Kafka;
  * on every partition assignment the consumer seeks to the buffer's ``next_offsets()``, so the
    buffer, not Kafka's committed offsets, decides where to resume — a crash between the segment
    rename and the Kafka commit re-reads nothing;
  * on revocation the member flushes before giving the partition up, so the next owner's seek
    already sees everything this member consumed.

Bad records (undecodable bytes, schema violations, oversized payloads) go to the dead-letter topic
with the reason and their source offset in headers; their offsets still count as consumed.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from kafka import ConsumerRebalanceListener, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.consumer.fetcher import ConsumerRecord
from kafka.errors import CommitFailedError, KafkaError
from kafka.structs import OffsetAndMetadata

from streams.buffer import EventBuffer, OffsetRange, Segment
from streams.config import IngestConfig, KafkaConfig, TopicsConfig
from streams.events import DecodeError, RowBatch, decode

log = logging.getLogger(__name__)


@dataclass
class IngestStats:
    consumed: int = 0
    ingested: int = 0
    dead_lettered: dict[str, int] = field(default_factory=dict)
    segments: int = 0
    rebalances: int = 0
    started: float = field(default_factory=time.monotonic)

    @property
    def dead_letter_total(self) -> int:
        return sum(self.dead_lettered.values())


class _Pending:
    """Records consumed since the last flush: valid rows plus the offset span of every record."""

    def __init__(self) -> None:
        self.rows = RowBatch()
        self.spans: dict[tuple[str, int], list[int]] = {}  # tp -> [first, last + 1]
        self.records = 0
        self.since = time.monotonic()

    def cover(self, topic: str, partition: int, offset: int) -> None:
        span = self.spans.get((topic, partition))
        if span is None:
            self.spans[(topic, partition)] = [offset, offset + 1]
        else:
            span[1] = offset + 1
        self.records += 1

    def ranges(self) -> list[OffsetRange]:
        return [OffsetRange(t, p, s, e) for (t, p), (s, e) in sorted(self.spans.items())]


class Ingestor:
    """One member of the ingest consumer group. ``run()`` blocks until stopped or idle."""

    def __init__(
        self,
        kafka: KafkaConfig,
        topics: TopicsConfig,
        cfg: IngestConfig,
        buffer: EventBuffer,
        on_flush: Callable[[Segment, IngestStats], None] | None = None,
    ) -> None:
        self.kafka, self.topics, self.cfg, self.buffer = kafka, topics, cfg, buffer
        self.on_flush = on_flush
        self.stats = IngestStats()
        self.stop_event = threading.Event()
        self._pending = _Pending()
        # pyarrow's first list->array conversion pays a one-time lazy import (~2 s, pandas);
        # pay it now rather than while partitions are assigned and records wait.
        self._pending.rows.to_table()
        self.member = f"{socket.gethostname()}:{os.getpid()}"
        self._consumer: KafkaConsumer | None = None
        self._dlq: KafkaProducer | None = None

    # -- lifecycle ----------------------------------------------------------------------
    def run(self) -> IngestStats:
        common = self.kafka.client_kwargs()
        self._consumer = KafkaConsumer(
            **common,
            group_id=self.cfg.group_id,
            group_instance_id=self.cfg.instance_id,
            session_timeout_ms=self.cfg.session_timeout_ms,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_poll_records=self.cfg.max_poll_records,
            # Oversized records must still be fetched so they can be dead-lettered.
            max_partition_fetch_bytes=8 * 1024 * 1024,
            fetch_max_bytes=64 * 1024 * 1024,
            # read_committed would be right for transactional producers, but kafka-python 3.0.12
            # stops returning records while an idempotent producer is still writing (seen
            # against Kafka 4.1), so ingest reads uncommitted; our producers are not transactional.
            isolation_level="read_uncommitted",
        )
        self._dlq = KafkaProducer(**common, acks="all", linger_ms=5, max_request_size=8 << 20)
        self._consumer.subscribe([self.topics.events], listener=_Rebalance(self))
        started = idle_since = time.monotonic()
        # Batch mode exits once caught up, and "caught up" needs partitions: while the group still
        # waits out a dead member's session, no time counts as idle (bounded by two sessions).
        unassigned_limit = 2 * self.cfg.session_timeout_ms / 1000
        try:
            while not self.stop_event.is_set():
                batch = self._consumer.poll(timeout_ms=200, max_records=self.cfg.max_poll_records)
                n = sum(len(msgs) for msgs in batch.values())
                now = time.monotonic()
                waiting = not self._consumer.assignment() and now - started < unassigned_limit
                if n or waiting:
                    idle_since = now
                    for msgs in batch.values():
                        self._consume(msgs)
                if self._should_flush():
                    self.flush()
                idle = time.monotonic() - idle_since
                if self.cfg.idle_exit_s is not None and idle > self.cfg.idle_exit_s:
                    break
        finally:
            self.close()
        return self.stats

    def stop(self) -> None:
        self.stop_event.set()

    def close(self) -> None:
        try:
            self.flush()
        finally:
            if self._consumer is not None:
                self._consumer.close(autocommit=False)
                self._consumer = None
            if self._dlq is not None:
                self._dlq.close(timeout=10)
                self._dlq = None

    # -- the work -----------------------------------------------------------------------
    def _consume(self, msgs: list[ConsumerRecord]) -> None:
        pending = self._pending
        limit = self.cfg.max_event_bytes
        for m in msgs:
            pending.cover(m.topic, m.partition, m.offset)
            self.stats.consumed += 1
            value = m.value
            if value is not None and len(value) > limit:
                self._dead_letter(m, "oversized", f"{len(value)} bytes > max_event_bytes={limit}")
                continue
            try:
                event = decode(value)
            except DecodeError as err:
                self._dead_letter(m, err.reason, err.detail)
                continue
            pending.rows.append(event, m.topic, m.partition, m.offset)

    def _dead_letter(self, m: ConsumerRecord, reason: str, detail: str) -> None:
        assert self._dlq is not None
        headers = [
            ("reason", reason.encode()),
            ("detail", detail[:1000].encode()),
            ("source_topic", m.topic.encode()),
            ("source_partition", str(m.partition).encode()),
            ("source_offset", str(m.offset).encode()),
        ]
        self._dlq.send(self.topics.dead_letter, key=m.key, value=m.value, headers=headers)
        self.stats.dead_lettered[reason] = self.stats.dead_lettered.get(reason, 0) + 1

    def _should_flush(self) -> bool:
        p = self._pending
        return p.records > 0 and (
            p.records >= self.cfg.segment_rows
            or time.monotonic() - p.since >= self.cfg.flush_interval_s
        )

    def flush(self, commit: bool = True) -> Segment | None:
        """Make pending records durable, then (unless told not to) commit their offsets."""
        p = self._pending
        if p.records == 0:
            return None
        if self._dlq is not None:
            # Dead letters must be durable before their offsets count as consumed.
            self._dlq.flush(timeout=30)
        seg = self.buffer.append(p.rows.to_table(), p.ranges(), writer=self.member)
        self._pending = _Pending()
        self.stats.ingested += seg.rows
        self.stats.segments += 1
        if commit:
            self._commit(seg)
        if self.on_flush is not None:
            self.on_flush(seg, self.stats)
        return seg

    def _commit(self, seg: Segment) -> None:
        # Kafka's committed offsets only feed lag monitoring; the buffer is authoritative.
        if self._consumer is None:
            return
        offsets = {
            TopicPartition(r.topic, r.partition): OffsetAndMetadata(r.end, "", -1)
            for r in seg.ranges
        }
        try:
            self._consumer.commit(offsets)
        except (CommitFailedError, KafkaError) as err:
            log.warning("offset commit failed (harmless, the buffer is authoritative): %s", err)

    def _on_assigned(self, assigned: list[TopicPartition]) -> None:
        assert self._consumer is not None
        self.stats.rebalances += 1
        resume = self.buffer.next_offsets()
        for tp in assigned:
            pos = resume.get((tp.topic, tp.partition))
            if pos is None:
                self._consumer.seek_to_beginning(tp)
            else:
                self._consumer.seek(tp, pos)
        log.info("assigned %s", sorted((tp.topic, tp.partition) for tp in assigned))


class _Rebalance(ConsumerRebalanceListener):
    def __init__(self, ingestor: Ingestor) -> None:
        self.ingestor = ingestor

    def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        # Durable before the partitions move, so the next owner's seek sees these records.
        # No Kafka commit here: kafka-python runs listeners on its IO thread, where a blocking
        # commit is refused; the buffer is authoritative anyway.
        self.ingestor.flush(commit=False)

    def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        self.ingestor._on_assigned(assigned)
