"""The dead-letter path of ingest: refused records to the dead-letter topic, acknowledged.

A record the decoder refuses (undecodable bytes, schema violations, oversized payloads) is sent
as it came, with the reason and its source offset in headers. Its offset counts as consumed only
once the dead-letter topic has acknowledged it, so ``confirm`` runs before every flush.
"""

from __future__ import annotations

import contextlib

from kafka import KafkaProducer
from kafka.consumer.fetcher import ConsumerRecord
from kafka.errors import KafkaError
from kafka.producer.future import FutureRecordMetadata

from streams.config import IngestConfig, KafkaConfig, TopicsConfig
from streams.errors import DeadLetterError


class DeadLetters:
    """One ingest member's producer to the dead-letter topic, open from ``open`` to ``close``."""

    def __init__(self, kafka: KafkaConfig, topics: TopicsConfig, cfg: IngestConfig) -> None:
        self.kafka, self.topics, self.cfg = kafka, topics, cfg
        self._producer: KafkaProducer | None = None

    @property
    def topic(self) -> str:
        return self.topics.dead_letter

    def open(self) -> None:
        self._producer = KafkaProducer(
            **self.kafka.client_kwargs(),
            acks="all",
            linger_ms=5,
            max_request_size=8 << 20,
            # A send that cannot even get the topic's metadata fails the flush, not the process.
            max_block_ms=int(self.cfg.dead_letter_timeout_s * 1000),
            # kafka-python's idempotent producer turns fatal after one refused batch and never
            # sends again; a plain one fails that batch and retries later. A retried dead letter
            # may land twice, which the DLQ tolerates (at least once), never zero times.
            enable_idempotence=False,
            reconnect_backoff_max_ms=int(self.cfg.reconnect_backoff_max_s * 1000),
        )

    def send(self, m: ConsumerRecord, reason: str, detail: str) -> FutureRecordMetadata:
        """Send ``m`` with why it was refused; DeadLetterError if the producer will not take it."""
        if self._producer is None:
            raise DeadLetterError("the dead-letter producer is closed")
        headers = [
            ("reason", reason.encode()),
            ("detail", detail[:1000].encode()),
            ("source_topic", m.topic.encode()),
            ("source_partition", str(m.partition).encode()),
            ("source_offset", str(m.offset).encode()),
        ]
        try:
            return self._producer.send(self.topic, key=m.key, value=m.value, headers=headers)
        except KafkaError as err:  # e.g. no metadata for the topic within max_block_ms
            raise DeadLetterError(
                f"dead letter for {m.topic}:{m.partition}@{m.offset} not accepted by "
                f"{self.topic}: {err!r}"
            ) from err

    def confirm(self, dead: list[tuple[FutureRecordMetadata, str, int, int]]) -> None:
        """Raise DeadLetterError unless the DLQ acknowledged every one of ``dead``."""
        if not dead:
            return
        topic = self.topic
        if self._producer is None:
            raise DeadLetterError("the dead-letter producer is closed")
        try:
            self._producer.flush(timeout=self.cfg.dead_letter_timeout_s)
        except KafkaError as err:
            raise DeadLetterError(
                f"{topic} did not acknowledge {len(dead)} dead letters within "
                f"{self.cfg.dead_letter_timeout_s:.0f}s: {err!r}"
            ) from err
        bad = [(f, t, part, off) for f, t, part, off in dead if not f.succeeded()]
        if bad:
            f, t, part, off = bad[0]
            raise DeadLetterError(
                f"{topic} refused {len(bad)} of {len(dead)} dead letters (first: source "
                f"{t}:{part}@{off}: {f.exception!r})"
            )

    def close(self) -> None:
        if self._producer is not None:
            with contextlib.suppress(KafkaError):  # unacknowledged ones were not counted
                self._producer.close(timeout=10)
            self._producer = None
