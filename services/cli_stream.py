"""CLI commands of the Kafka side: the embedded broker, producing, ingesting, the buffer."""

from __future__ import annotations

import logging
import signal
import time
from collections.abc import Callable
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from services.settings import Settings
from streams import broker as broker_mod
from streams.admin import ensure_topics, topic_lag
from streams.buffer import EventBuffer
from streams.datasets import DEFAULT_ML100K, DriftSpec, generic_csv, movielens_100k, synthetic_drift
from streams.events import Event
from streams.ingest import Ingestor
from streams.producer import replay
from streams.progress import working

console = Console()
SettingsOf = Callable[[typer.Context], Settings]


class Source(StrEnum):
    movielens = "movielens"
    csv = "csv"
    synthetic = "synthetic"


def load_events(source: Source, path: Path | None, n: int, seed: int) -> list[Event]:
    if source is Source.movielens:
        return movielens_100k(path or DEFAULT_ML100K)
    if source is Source.csv:
        if path is None:
            raise typer.BadParameter("--path is required with --source csv")
        return generic_csv(path)
    return list(synthetic_drift(DriftSpec(events=n, seed=seed)))


def ensure_broker(settings: Settings) -> None:
    """Start the embedded broker if the settings use it, and make sure the topics exist."""
    if settings.embedded_broker:
        broker_mod.LocalBroker(settings.broker).up()
    ensure_topics(settings.kafka, settings.topics)


def register(app: typer.Typer, settings_of: SettingsOf) -> None:
    """Attach the Kafka side's commands to ``app``, in the order ``--help`` lists them."""
    app.add_typer(_kafka_app(settings_of), name="kafka")
    _produce_command(app, settings_of)
    _ingest_command(app, settings_of)
    app.add_typer(_buffer_app(settings_of), name="buffer")


def _kafka_app(settings_of: SettingsOf) -> typer.Typer:
    kafka = typer.Typer(help="Manage the embedded Apache Kafka broker (KRaft, 127.0.0.1).")

    @kafka.command("fetch")
    def kafka_fetch(ctx: typer.Context) -> None:
        """Download the broker jars from Maven Central into the cache (once)."""
        libs = broker_mod.fetch(settings_of(ctx).broker)
        console.print(f"Kafka jars in [bold]{libs}[/]")

    @kafka.command("up")
    def kafka_up(ctx: typer.Context) -> None:
        """Start the broker (no-op if running) and wait until it answers; create the topics."""
        s = settings_of(ctx)
        with working("starting Kafka"):
            st = broker_mod.LocalBroker(s.broker).up()
            created = ensure_topics(s.kafka, s.topics)
        console.print(f"Kafka up on [bold]{st.bootstrap}[/] (pid {st.pid}); created {created}")

    @kafka.command("down")
    def kafka_down(ctx: typer.Context) -> None:
        """Stop the embedded broker."""
        stopped = broker_mod.LocalBroker(settings_of(ctx).broker).down()
        console.print("Kafka stopped" if stopped else "Kafka was not running")

    @kafka.command("status")
    def kafka_status(ctx: typer.Context) -> None:
        """Whether the broker runs, and the ingest lag per partition."""
        s = settings_of(ctx)
        st = broker_mod.LocalBroker(s.broker).status()
        console.print(
            f"broker: {'running' if st.running else 'stopped'} pid={st.pid} "
            f"answering={st.answering} bootstrap={st.bootstrap} state={st.state_dir}"
        )
        if st.answering or not s.embedded_broker:
            lag = topic_lag(s.kafka, s.topics.events, EventBuffer(s.buffer).watermark())
            console.print(f"ingest lag per partition of {s.topics.events}: {lag}")

    return kafka


def _produce_command(app: typer.Typer, settings_of: SettingsOf) -> None:
    @app.command()
    def produce(
        ctx: typer.Context,
        source: Annotated[Source, typer.Option(help="What to replay.")] = Source.movielens,
        path: Annotated[
            Path | None, typer.Option(help="ML-100K folder or CSV file (user,item,ts[,rating]).")
        ] = None,
        rate: Annotated[
            float | None, typer.Option(help="Events per second; omit for as fast as possible.")
        ] = None,
        limit: Annotated[int | None, typer.Option(help="Send at most this many events.")] = None,
        events: Annotated[int, typer.Option(help="Synthetic: how many events.")] = 20_000,
        seed: Annotated[int, typer.Option(help="Synthetic: random seed.")] = 0,
    ) -> None:
        """Replay a dataset into the events topic in timestamp order, keyed by user."""
        s = settings_of(ctx)
        ensure_broker(s)
        evs = load_events(source, path, events, seed)[:limit]
        n = replay(evs, s.kafka, s.topics.events, rate=rate, total=len(evs), progress=True)
        console.print(f"sent {n} events to {s.topics.events}")


def _ingest_command(app: typer.Typer, settings_of: SettingsOf) -> None:
    @app.command()
    def ingest(
        ctx: typer.Context,
        idle_exit: Annotated[
            float | None, typer.Option(help="Exit after this many idle seconds (batch mode).")
        ] = None,
        segment_rows: Annotated[int | None, typer.Option(help="Records per segment.")] = None,
        flush_interval: Annotated[float | None, typer.Option(help="Max seconds per flush.")] = None,
    ) -> None:
        """Run one ingest consumer-group member until Ctrl-C (or idle): Kafka -> buffer."""
        s = settings_of(ctx)
        if idle_exit is not None:
            s.ingest.idle_exit_s = idle_exit
        if segment_rows is not None:
            s.ingest.segment_rows = segment_rows
        if flush_interval is not None:
            s.ingest.flush_interval_s = flush_interval
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
        ensure_topics(s.kafka, s.topics)
        ing = Ingestor(s.kafka, s.topics, s.ingest, EventBuffer(s.buffer))
        # Graceful stop: finish the poll, flush pending records durably, then exit.
        signal.signal(signal.SIGTERM, lambda *_: ing.stop())
        signal.signal(signal.SIGINT, lambda *_: ing.stop())
        stats = ing.run()
        console.print(
            f"ingested {stats.ingested} events in {stats.segments} segments; "
            f"dead-lettered {stats.dead_letter_total} {stats.dead_lettered}"
        )


def _buffer_app(settings_of: SettingsOf) -> typer.Typer:
    buffer = typer.Typer(help="Inspect and maintain the event buffer.")

    @buffer.command("stats")
    def buffer_stats(ctx: typer.Context) -> None:
        """Segments, rows and per-partition watermark of the buffer."""
        st = EventBuffer(settings_of(ctx).buffer).stats()
        t = Table("segments", "rows", "MiB", "watermark")
        t.add_row(str(st.segments), str(st.rows), f"{st.bytes / 2**20:.1f}", str(st.partitions))
        console.print(t)

    @buffer.command("compact")
    def buffer_compact(ctx: typer.Context) -> None:
        """Merge small segments and apply retention."""
        buf = EventBuffer(settings_of(ctx).buffer)
        t0 = time.monotonic()
        with working("merging small segments"):
            merged = buf.compact()
        with working("applying retention"):
            dropped = buf.apply_retention()
        console.print(
            f"merged {merged} segments, retired {dropped}, in {time.monotonic() - t0:.1f}s"
        )

    return buffer
