"""Replays events into a Kafka topic in timestamp order, at a chosen rate or as fast as possible."""

from __future__ import annotations

import time
from collections.abc import Iterable

from kafka import KafkaProducer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from streams.config import KafkaConfig
from streams.events import Event
from streams.security import check_connection


def make_producer(kafka: KafkaConfig) -> KafkaProducer:
    check_connection(kafka)  # bad credentials: a message naming the setting, not a 30 s hang
    # Idempotent producer: broker-side dedup of retried batches, so a replay never doubles events.
    return KafkaProducer(
        **kafka.client_kwargs(),
        acks="all",
        enable_idempotence=True,
        linger_ms=10,
        batch_size=512 * 1024,
        max_request_size=8 << 20,
    )


def replay(
    events: Iterable[Event],
    kafka: KafkaConfig,
    topic: str,
    rate: float | None = None,
    total: int | None = None,
    progress: bool = False,
    producer: KafkaProducer | None = None,
) -> int:
    """Publish ``events`` keyed by user_id; ``rate`` is events/s (None = as fast as possible).

    Returns how many were sent. All sends are acknowledged before it returns.
    """
    if rate is not None and rate <= 0:
        raise ValueError(f"rate must be positive events/s or None for unthrottled, got {rate}")
    own = producer is None
    prod = producer or make_producer(kafka)
    sent = 0
    start = time.monotonic()
    bar = Progress(
        TextColumn("[bold]produce[/] " + topic),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        disable=not progress,
        transient=False,
    )
    try:
        with bar:
            task = bar.add_task("produce", total=total)
            for event in events:
                if rate is not None:
                    ahead = sent / rate - (time.monotonic() - start)
                    if ahead > 0:
                        time.sleep(ahead)
                prod.send(topic, key=event.key(), value=event.encode())
                sent += 1
                if sent % 1000 == 0:
                    bar.update(task, completed=sent)
            prod.flush(timeout=120)
            bar.update(task, completed=sent)
    finally:
        if own:
            prod.close(timeout=30)
    return sent
