"""Topics an operator owns: with ``topics.create: false`` streamtune creates nothing and says
at start-up which topic is missing (real broker)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
from kafka import KafkaAdminClient, KafkaConsumer

from streams.admin import await_partitions, ensure_topics
from streams.config import KafkaConfig, TopicsConfig
from streams.errors import MissingTopicError, StreamsError

pytestmark = [pytest.mark.integration]


def _existing(kafka: KafkaConfig) -> set[str]:
    admin = KafkaAdminClient(**kafka.client_kwargs())
    try:
        return set(admin.list_topics())
    finally:
        admin.close()


def test_create_false_never_creates_and_names_the_missing_topic(
    kafka: KafkaConfig, topics: TopicsConfig
) -> None:
    owned = topics.model_copy(update={"create": False})
    with pytest.raises(MissingTopicError) as err:
        ensure_topics(kafka, owned)
    message = str(err.value)
    assert isinstance(err.value, StreamsError)
    assert f"'{topics.events}' (topics.events)" in message
    assert f"'{topics.dead_letter}' (topics.dead_letter)" in message
    assert "topics.create" in message
    assert not {topics.events, topics.dead_letter} & _existing(kafka)  # nothing was created

    # The operator creates only the events topic: the dead-letter one alone is named now.
    assert ensure_topics(kafka, topics.model_copy(update={"dead_letter": "x-" + topics.events}))
    with pytest.raises(MissingTopicError) as err:
        ensure_topics(kafka, owned)
    assert topics.dead_letter in str(err.value) and f"'{topics.events}'" not in str(err.value)

    # Both exist: nothing to do, nothing created.
    assert ensure_topics(kafka, topics) == [topics.dead_letter]
    assert ensure_topics(kafka, owned) == []


def test_ingest_refuses_to_start_on_a_missing_topic_with_create_false(
    kafka: KafkaConfig, topics: TopicsConfig
) -> None:
    env = dict(
        os.environ,
        STREAMTUNE_EMBEDDED_BROKER="false",
        STREAMTUNE_KAFKA__BOOTSTRAP_SERVERS=kafka.bootstrap_servers,
        STREAMTUNE_TOPICS__EVENTS=topics.events,
        STREAMTUNE_TOPICS__DEAD_LETTER=topics.dead_letter,
        STREAMTUNE_TOPICS__CREATE="false",
    )
    done = subprocess.run(
        [sys.executable, "-m", "services.cli", "ingest", "--idle-exit", "1"],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode != 0
    assert "MissingTopicError" in done.stderr and topics.events in done.stderr, done.stderr[-3000:]
    assert "topics.create" in done.stderr
    assert not {topics.events, topics.dead_letter} & _existing(kafka)


def test_a_consumer_waits_for_the_partitions_and_never_follows_nothing(
    kafka: KafkaConfig, topics: TopicsConfig
) -> None:
    # Right after a topic's creation kafka-python's metadata may list no partitions; a group
    # joined then was assigned none and a whole batch ingest read nothing.
    consumer = KafkaConsumer(**kafka.client_kwargs())
    try:
        t0 = time.monotonic()
        with pytest.raises(MissingTopicError, match=topics.events):
            await_partitions(consumer, topics.events, timeout_s=1.0)
        assert time.monotonic() - t0 >= 1.0  # it waited before giving up
        ensure_topics(kafka, topics)
        assert await_partitions(consumer, topics.events) == set(range(topics.partitions))
    finally:
        consumer.close()
