"""Topic management and consumer-lag inspection with kafka-python's admin client."""

from __future__ import annotations

import contextlib

from kafka import KafkaAdminClient, KafkaConsumer, TopicPartition
from kafka.admin import NewTopic
from kafka.errors import TopicAlreadyExistsError

from streams.config import KafkaConfig, TopicsConfig


def ensure_topics(kafka: KafkaConfig, topics: TopicsConfig) -> list[str]:
    """Create the events and dead-letter topics if missing; returns the ones created."""
    admin = KafkaAdminClient(**kafka.client_kwargs())
    try:
        existing = set(admin.list_topics())
        wanted = [
            NewTopic(topics.events, topics.partitions, topics.replication_factor),
            # Dead letters are rare; one partition keeps them in arrival order.
            NewTopic(topics.dead_letter, 1, topics.replication_factor),
        ]
        missing = [t for t in wanted if t.name not in existing]
        if missing:
            with contextlib.suppress(TopicAlreadyExistsError):  # created concurrently
                admin.create_topics(missing)
        return [t.name for t in missing]
    finally:
        admin.close()


def end_offsets(kafka: KafkaConfig, topic: str) -> dict[int, int]:
    """Log-end offset per partition of ``topic``."""
    consumer = KafkaConsumer(**kafka.client_kwargs())
    try:
        parts = consumer.partitions_for_topic(topic) or set()
        tps = [TopicPartition(topic, p) for p in sorted(parts)]
        return {tp.partition: off for tp, off in consumer.end_offsets(tps).items()}
    finally:
        consumer.close()


def topic_lag(kafka: KafkaConfig, topic: str, consumed: dict[str, int]) -> dict[int, int]:
    """Per partition: records in Kafka that ``consumed`` (a buffer watermark) does not hold."""
    ends = end_offsets(kafka, topic)
    return {p: max(0, end - consumed.get(f"{topic}:{p}", 0)) for p, end in ends.items()}
