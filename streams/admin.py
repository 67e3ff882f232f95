"""Topic management and consumer-lag inspection with kafka-python's admin client."""

from __future__ import annotations

import contextlib
import time

from kafka import KafkaAdminClient, KafkaConsumer, TopicPartition
from kafka.admin import NewTopic
from kafka.errors import TopicAlreadyExistsError

from streams.config import KafkaConfig, TopicsConfig
from streams.errors import MissingTopicError
from streams.security import check_connection


def ensure_topics(kafka: KafkaConfig, topics: TopicsConfig) -> list[str]:
    """Create the events and dead-letter topics if missing; returns the ones created.

    With ``topics.create`` false nothing is created or altered: a missing topic raises
    MissingTopicError naming it (and what to do), and the return is always empty.
    """
    check_connection(kafka)  # wrong TLS/SASL settings fail here by name, not in a 30 s hang
    admin = KafkaAdminClient(**kafka.client_kwargs())
    try:
        # Lists only the topics this principal may describe: under ACLs, one it may not is
        # reported missing too, which is what it is to streamtune.
        existing = set(admin.list_topics())
        wanted = [
            NewTopic(topics.events, topics.partitions, topics.replication_factor),
            # Dead letters are rare; one partition keeps them in arrival order.
            NewTopic(topics.dead_letter, 1, topics.replication_factor),
        ]
        missing = [t for t in wanted if t.name not in existing]
        if missing and not topics.create:
            raise MissingTopicError(
                "; ".join(
                    f"topic {t.name!r} (topics.{role}) does not exist on {kafka.bootstrap_servers}"
                    for role, t in zip(("events", "dead_letter"), wanted, strict=True)
                    if t in missing
                )
                + ". topics.create is false, so streamtune does not create it: create it "
                "(or have it created), point the setting at an existing topic, or set "
                "topics.create: true"
            )
        if missing:
            with contextlib.suppress(TopicAlreadyExistsError):  # created concurrently
                admin.create_topics(missing)
            _await_metadata(admin, {t.name for t in missing})
        return [t.name for t in missing]
    finally:
        admin.close()


def _await_metadata(admin: KafkaAdminClient, names: set[str], timeout_s: float = 15.0) -> None:
    """Wait until the brokers list topics just created: the create returns once the controller
    accepted them, and a client that looks them up before the metadata spreads finds nothing."""
    deadline = time.monotonic() + timeout_s
    while not names <= set(admin.list_topics()) and time.monotonic() < deadline:
        time.sleep(0.1)


def await_partitions(consumer: KafkaConsumer, topic: str, timeout_s: float = 30.0) -> set[int]:
    """The partitions of ``topic`` as ``consumer`` sees them, waiting while its metadata lists
    none (a topic just created spreads to the brokers' metadata caches with a delay).

    Raises MissingTopicError if none show up within ``timeout_s``: a consumer that went on
    would silently follow nothing.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        parts = consumer.partitions_for_topic(topic)
        if parts:
            return set(parts)
        if time.monotonic() > deadline:
            raise MissingTopicError(
                f"topic {topic!r} lists no partitions after {timeout_s:.0f} s: check that it "
                "exists and that this principal may describe it (topics.create makes it)"
            )
        time.sleep(0.2)


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
