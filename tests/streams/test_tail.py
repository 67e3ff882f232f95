"""The live tail the history component follows: it starts exactly where the buffer ends."""

from __future__ import annotations

import time

import pytest

from streams.admin import ensure_topics
from streams.config import KafkaConfig, TopicsConfig
from streams.datasets import DriftSpec, synthetic_drift
from streams.events import Event
from streams.producer import replay
from streams.tail import EventTail

pytestmark = [pytest.mark.integration]


def _drain(tail: EventTail, want: int, timeout: float = 30.0) -> list[Event]:
    got: list[Event] = []
    deadline = time.monotonic() + timeout
    while len(got) < want and time.monotonic() < deadline:
        got += tail.poll(timeout_ms=200)
    got += tail.poll(timeout_ms=500)  # and nothing more arrives
    return got


def test_tail_starts_where_the_buffer_ends(kafka: KafkaConfig, topics: TopicsConfig) -> None:
    topics = topics.model_copy(update={"partitions": 1})
    ensure_topics(kafka, topics)
    events = list(synthetic_drift(DriftSpec(users=5, events=40, seed=1)))
    replay(events[:30], kafka, topics.events)
    ids = [e.event_id for e in events]

    # An empty buffer: everything in Kafka is new to it (this tail once started at the end and
    # lost what was published before the history actor came up).
    from_empty = EventTail(kafka, topics, "g1", start={})
    # A buffer that holds offsets 0..9: the tail resumes at 10, nothing counted twice.
    from_ten = EventTail(kafka, topics, "g2", start={(topics.events, 0): 10})
    # No buffer at all: only what is published from now on.
    live_only = EventTail(kafka, topics, "g3", start=None)
    replay(events[30:], kafka, topics.events)
    try:
        assert [e.event_id for e in _drain(from_empty, 40)] == ids
        assert [e.event_id for e in _drain(from_ten, 30)] == ids[10:]
        assert [e.event_id for e in _drain(live_only, 10)] == ids[30:]
    finally:
        for t in (from_empty, from_ten, live_only):
            t.close()
