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
with the reason and their source offset in headers; their offsets count as consumed only once the
dead-letter topic has acknowledged every one of them.

A flush that cannot complete (the dead-letter topic does not acknowledge, the disk is full) writes
nothing: the pending records are dropped from memory, every assigned partition is rewound to the
buffer's ``next_offsets()`` and the member retries after a growing wait, so the records are re-read
from Kafka rather than lost. A batch the buffer refuses as already held (a stale member, fenced)
is dropped the same way without waiting.

The records held between flushes are ``streams.pending``'s; the dead-letter path is
``streams.deadletter``'s.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from kafka import ConsumerRebalanceListener, KafkaConsumer, TopicPartition
from kafka.consumer.fetcher import ConsumerRecord
from kafka.errors import CommitFailedError, KafkaError
from kafka.structs import OffsetAndMetadata

from streams.admin import await_partitions
from streams.buffer import EventBuffer
from streams.codec import decode_batch
from streams.config import IngestConfig, KafkaConfig, TopicsConfig
from streams.deadletter import DeadLetters
from streams.errors import DeadLetterError, DiskFullError, FencedError, StreamsError
from streams.formats import Decoder
from streams.pending import Pending
from streams.security import check_connection
from streams.segments import Segment

log = logging.getLogger(__name__)


@dataclass
class IngestStats:
    consumed: int = 0
    ingested: int = 0
    dead_lettered: dict[str, int] = field(default_factory=dict)
    segments: int = 0
    rebalances: int = 0
    started: float = field(default_factory=time.monotonic)
    first_record_at: float | None = (
        None  # monotonic time the first record arrived (joined, fetched)
    )
    flush_failures: int = 0  # flushes that wrote nothing (DLQ not acknowledging, disk full, ...)
    dead_letter_failures: int = 0
    disk_full: int = 0
    fenced: int = 0  # offsets refused because the buffer already held them (a stale batch)
    rewinds: int = 0  # times the assigned partitions were sought back to the buffer's offsets
    last_error: str = ""

    @property
    def dead_letter_total(self) -> int:
        return sum(self.dead_lettered.values())


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
        self._pending = Pending()
        # pyarrow's first list->array conversion pays a one-time lazy import (~2 s, pandas);
        # pay it now rather than while partitions are assigned and records wait.
        decode_batch([])
        self.member = f"{socket.gethostname()}:{os.getpid()}"
        self._consumer: KafkaConsumer | None = None
        self._dlq = DeadLetters(kafka, topics, cfg)
        self._failures = 0  # consecutive failed flushes: the retry wait doubles with each
        self._fences = 0  # consecutive refused (stale) batches
        self._quarantined = 0
        self._decoder = ThreadPoolExecutor(1, thread_name_prefix="ingest-decode")
        self._decode = Decoder(cfg, self.stop_event)  # JSON (native or mapped) or Avro

    # -- lifecycle ----------------------------------------------------------------------
    def run(self) -> IngestStats:
        check_connection(self.kafka)  # wrong TLS/SASL settings fail here by name, not in a hang
        common = self.kafka.client_kwargs()
        self._decoder = ThreadPoolExecutor(1, thread_name_prefix="ingest-decode")  # close() ends it
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
            reconnect_backoff_max_ms=int(self.cfg.reconnect_backoff_max_s * 1000),
        )
        self._dlq.open()
        # Know the topic's partitions before joining: kafka-python may otherwise join with
        # metadata that lists none, so the group leader assigns nothing, and the metadata that
        # arrives next forces a second rebalance, which now and then never completed (seen:
        # a whole batch run that consumed nothing). The fresh fetch after subscribing gives the
        # coordinator the partitions it compares its assignment with, so one join suffices.
        await_partitions(self._consumer, self.topics.events)
        self._consumer.subscribe([self.topics.events], listener=_Rebalance(self))
        self._consumer.topics()
        started = idle_since = time.monotonic()
        # Batch mode exits once caught up, and "caught up" needs partitions: while the group still
        # waits out a dead member's session, no time counts as idle (bounded by two sessions).
        unassigned_limit = 2 * self.cfg.session_timeout_ms / 1000
        self._quarantined = self.buffer.quarantine_count()
        try:
            while not self.stop_event.is_set():
                batch = self._consumer.poll(timeout_ms=200, max_records=self.cfg.max_poll_records)
                n = sum(len(msgs) for msgs in batch.values())
                now = time.monotonic()
                waiting = not self._consumer.assignment() and now - started < unassigned_limit
                if n or waiting or self._failures:
                    idle_since = now
                try:
                    for msgs in batch.values():
                        self._consume(msgs)
                    self._collect(wait=False)
                    if self._should_flush():
                        self.flush()
                except StreamsError as err:
                    self._retry(err)
                idle = time.monotonic() - idle_since
                # Quiet is not caught up: a first fetch can take longer than idle_exit_s (a slow
                # TLS broker). Still behind after the bound: exit anyway, as before.
                limit = self.cfg.idle_exit_s
                if (
                    limit is not None
                    and idle > limit
                    and (idle > limit + unassigned_limit or _caught_up(self._consumer))
                ):
                    break
        finally:
            self.close()
        return self.stats

    def stop(self) -> None:
        self.stop_event.set()

    def close(self) -> None:
        try:
            self.flush()
        except StreamsError as err:
            # Not lost: the buffer does not cover these offsets, so the next run re-reads them.
            self._discard(err)
        finally:
            if self._consumer is not None:
                self._consumer.close(autocommit=False)
                self._consumer = None
            self._decoder.shutdown(wait=True, cancel_futures=True)
            self._decode.close()
            self._dlq.close()

    # -- the work -----------------------------------------------------------------------
    def _consume(self, msgs: list[ConsumerRecord]) -> None:
        """One partition's records of a poll (Kafka returns them in offset order), handed to the
        decode thread while this one goes back to Kafka; ``_collect`` takes the results."""
        if not msgs:
            return
        if self.stats.first_record_at is None:
            self.stats.first_record_at = time.monotonic()
        self.stats.consumed += len(msgs)
        self._pending.submit(msgs, self._decoder, self._decode, self.cfg.max_event_bytes)

    def _collect(self, wait: bool) -> None:
        self._pending.collect(wait, self._dead_letter)

    def _dead_letter(self, m: ConsumerRecord, reason: str, detail: str) -> None:
        # Booked on the batch being collected: its flush waits for the acknowledgement.
        self._pending.dead_lettered(self._dlq.send(m, reason, detail), m, reason)

    def _should_flush(self) -> bool:
        p = self._pending
        return p.records > 0 and (
            p.records >= self.cfg.segment_rows
            or time.monotonic() - p.since >= self.cfg.flush_interval_s
        )

    def flush(self, commit: bool = True) -> Segment | None:
        """Make pending records durable, then (unless told not to) commit their offsets.

        Raises a StreamsError, having written nothing, if a dead letter was not acknowledged
        (DeadLetterError), the segment could not be written (DiskFullError, BufferWriteError) or
        the buffer already holds every offset (FencedError). The pending records stay pending;
        ``run`` drops and re-reads them.
        """
        p = self._pending
        if p.records == 0:
            return None
        self._collect(wait=True)
        # Dead letters must be durable before their offsets count as consumed.
        self._dlq.confirm(p.dead)
        seg = self.buffer.append(p.table(), p.ranges(), writer=self.member)
        self._pending = Pending()
        self._failures = self._fences = 0
        self.stats.ingested += seg.rows
        self.stats.segments += 1
        for reason, n in p.dead_by_reason.items():
            self.stats.dead_lettered[reason] = self.stats.dead_lettered.get(reason, 0) + n
        if seg.fenced:
            self.stats.fenced += seg.fenced
        if commit:
            self._commit(seg)
        if self.on_flush is not None:
            self.on_flush(seg, self.stats)
        self._follow_quarantine()
        return seg

    def _follow_quarantine(self) -> None:
        # A segment quarantined since we last looked may cover our partitions: seek back so the
        # hole is re-read from Kafka (the buffer drops what it already holds).
        q = self.buffer.quarantine_count()
        if q != self._quarantined:
            self._quarantined = q
            log.warning("a buffer segment was quarantined; re-reading from the buffer's offsets")
            self._rewind()

    def _retry(self, err: StreamsError) -> None:
        """A flush wrote nothing: drop the pending records, rewind, wait, and read them again."""
        records = self._discard(err)
        self._rewind()
        if isinstance(err, FencedError):
            # Another member holds these offsets: re-read at once. Only a repeat waits (offsets
            # the buffer lost that Kafka no longer has would otherwise spin this loop).
            self._fences += 1
            if self._fences > 1:
                self.stop_event.wait(self._backoff(self._fences - 1))
            return
        self._failures += 1
        delay = self._backoff(self._failures)
        log.error(
            "ingest paused: %s; %d records not committed (re-read from Kafka, not dropped); "
            "retry %d in %.1fs", err, records, self._failures, delay,
        )  # fmt: skip
        self.stop_event.wait(delay)

    def _backoff(self, attempt: int) -> float:
        return float(min(self.cfg.retry_max_s, self.cfg.retry_initial_s * 2 ** (attempt - 1)))

    def _discard(self, err: StreamsError) -> int:
        """Forget the pending records after a failed flush; returns how many there were."""
        records = self._pending.records
        self._pending.cancel()
        self._pending = Pending()
        self.stats.last_error = str(err)
        if isinstance(err, FencedError):
            self.stats.fenced += records
            log.warning("fenced: %d stale records refused: %s", records, err)
            return records
        self.stats.flush_failures += 1
        if isinstance(err, DeadLetterError):
            self.stats.dead_letter_failures += 1
        if isinstance(err, DiskFullError):
            self.stats.disk_full += 1
        return records

    def _rewind(self) -> None:
        if self._consumer is None:
            return
        assigned = list(self._consumer.assignment())
        if assigned:
            self.stats.rewinds += 1
            self._seek_to_buffer(assigned)

    def _seek_to_buffer(self, tps: list[TopicPartition]) -> None:
        assert self._consumer is not None
        resume = self.buffer.next_offsets()
        for tp in tps:
            pos = resume.get((tp.topic, tp.partition))
            if pos is None:
                self._consumer.seek_to_beginning(tp)
            else:
                self._consumer.seek(tp, pos)

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
        self._seek_to_buffer(assigned)
        log.info("assigned %s", sorted((tp.topic, tp.partition) for tp in assigned))


def _caught_up(consumer: KafkaConsumer) -> bool:
    """Batch mode's "nothing left": each assigned partition's position at its end offset."""
    tps = list(consumer.assignment())
    if not tps:  # not yet assigned (a join in progress): nothing read is not nothing left
        return False
    try:
        ends = consumer.end_offsets(tps, timeout_ms=5_000)
        return all((consumer.position(tp, timeout_ms=5_000) or 0) >= ends[tp] for tp in tps)
    except KafkaError:
        return False  # cannot tell now; the next idle check asks again


class _Rebalance(ConsumerRebalanceListener):
    def __init__(self, ingestor: Ingestor) -> None:
        self.ingestor = ingestor

    def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        # Durable before the partitions move, so the next owner's seek sees these records.
        # No Kafka commit here: kafka-python runs listeners on its IO thread, where a blocking
        # commit is refused; the buffer is authoritative anyway. If the flush cannot complete,
        # the records are dropped: the buffer does not cover them, so the next owner reads them.
        try:
            self.ingestor.flush(commit=False)
        except StreamsError as err:
            self.ingestor._discard(err)

    def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        self.ingestor._on_assigned(assigned)
