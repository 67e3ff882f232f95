"""`streamtune demo`: the main job on one machine, with embedded defaults.

Starts the local broker, replays MovieLens-100K into Kafka in time order, ingests it exactly once
into the durable buffer, and prints a summary that checks the round trip.
"""

from __future__ import annotations

import threading
import time

from rich.console import Console
from rich.table import Table

from services.settings import Settings
from streams.admin import ensure_topics, topic_lag
from streams.broker import LocalBroker
from streams.buffer import EventBuffer
from streams.datasets import DEFAULT_ML100K, movielens_100k
from streams.ingest import Ingestor
from streams.producer import replay


def run_ingest_demo(settings: Settings, rate: float | None, console: Console) -> dict[str, float]:
    """Broker up -> replay ML-100K -> concurrent ingest -> verify; returns the summary numbers."""
    if settings.embedded_broker:
        with console.status("starting the embedded Kafka broker"):
            LocalBroker(settings.broker).up()
    ensure_topics(settings.kafka, settings.topics)
    events = movielens_100k(DEFAULT_ML100K)
    buf = EventBuffer(settings.buffer)
    before = buf.stats().rows
    settings.ingest.idle_exit_s = 5.0
    ing = Ingestor(settings.kafka, settings.topics, settings.ingest, buf)
    worker = threading.Thread(target=ing.run, name="ingest")
    t0 = time.monotonic()
    worker.start()
    sent = replay(events, settings.kafka, settings.topics.events, rate=rate, total=len(events),
                  progress=True)  # fmt: skip
    produced_s = time.monotonic() - t0
    with console.status("waiting for ingest to drain"):
        worker.join()
    ingested = buf.stats().rows - before
    ids = buf.read(columns=["event_id"])["event_id"].to_pylist()
    lag = topic_lag(settings.kafka, settings.topics.events, buf.watermark())
    table = Table(title="streamtune demo: MovieLens-100K through Kafka into the buffer")
    table.add_column("what")
    table.add_column("value", justify="right")
    table.add_row("events produced", f"{sent:,}")
    table.add_row("events ingested this run", f"{ingested:,}")
    table.add_row("distinct event ids in buffer", f"{len(set(ids)):,}")
    table.add_row("duplicated ids in buffer", f"{len(ids) - len(set(ids)):,}")
    table.add_row("dead-lettered", f"{ing.stats.dead_letter_total:,}")
    table.add_row("segments written", f"{ing.stats.segments:,}")
    table.add_row("consumer lag after drain", f"{sum(lag.values()):,}")
    table.add_row("produce seconds", f"{produced_s:.1f}")
    console.print(table)
    return {"sent": sent, "ingested": ingested, "duplicated": len(ids) - len(set(ids))}
