"""The live tail of the events topic, from where the buffer ends, for in-memory views.

The history component (``serving.context``) rebuilds users' recent items from the buffer, then
follows Kafka from the buffer's next offsets, so every event is counted once. A partition the
buffer holds nothing of is read from its beginning, as ingest does (the same events, in the same
order); with no buffer at all only new events are followed. Undecodable records are skipped here:
ingest dead-letters them.
"""

from __future__ import annotations

from kafka import KafkaConsumer, TopicPartition

from streams.admin import await_partitions
from streams.config import KafkaConfig, TopicsConfig
from streams.events import DecodeError, Event, decode
from streams.security import check_connection


class EventTail:
    def __init__(
        self,
        kafka: KafkaConfig,
        topics: TopicsConfig,
        group_id: str,
        start: dict[tuple[str, int], int] | None,
    ) -> None:
        """``start``: the buffer's next offset per (topic, partition); None: no buffer."""
        check_connection(kafka)  # bad credentials: a message naming the setting, not a 30 s hang
        self._consumer = KafkaConsumer(
            **kafka.client_kwargs(), group_id=group_id, enable_auto_commit=False,
            auto_offset_reset="latest", fetch_max_wait_ms=50,
        )  # fmt: skip
        parts = await_partitions(self._consumer, topics.events)
        tps = [TopicPartition(topics.events, p) for p in sorted(parts)]
        self._consumer.assign(tps)
        for tp in tps:
            pos = None if start is None else start.get((tp.topic, tp.partition))
            if pos is not None:
                self._consumer.seek(tp, pos)
            elif start is not None:
                self._consumer.seek_to_beginning(tp)
            else:
                self._consumer.seek_to_end(tp)
        for tp in tps:  # resolve the positions now, not at the first poll
            self._consumer.position(tp)

    def poll(self, timeout_ms: int = 100) -> list[Event]:
        out = []
        for records in self._consumer.poll(timeout_ms=timeout_ms).values():
            for r in records:
                try:
                    out.append(decode(r.value))
                except DecodeError:
                    continue
        return out

    def close(self) -> None:
        self._consumer.close()
