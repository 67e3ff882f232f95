"""Ingest throughput: Kafka -> durable buffer, against two references measured in the same run.

    python -m bench.ingest [--events N] [--quick] [--repeats R]

References on the same topic and broker: (1) a bare kafka-python poll loop that only touches each
record (the client's ceiling), (2) Kafka's own JVM consumer (ConsumerPerformance). Our number is
sustained events/s from the first record until the last event is durably in the buffer (fsync'd
segments, offsets committed). The run also checks exactly-once: lost and duplicated event ids.

A second topic holds the same events in a foreign JSON shape (nested fields, ISO-8601 times,
the shop's own event-type names, no event ids), ingested through an ``ingest.mapping``: its row
and the ratio mapped/native say what the mapping costs. Native and mapped ingest alternate
``--repeats`` times; the table keeps each one's best run and the JSON also gives the median of
the per-repeat ratios. End to end, the broker, the client and the fsyncs share two cores with the
decoder, so the run also times the batch decoder alone, in process, on the same events in both
shapes: many alternating passes at two poll sizes, the median ratio (the mapping's own cost).

A third topic holds them as Avro in the Confluent wire format (the shop's shape as an Avro record,
schema registered in a real Apicurio Registry started here), ingested with ``ingest.format:
avro`` and the same mapping (epoch-ms times): its row says what Avro decoding costs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from rich.console import Console
from rich.table import Table

from bench.ingest_refs import bare_poll, jvm_perf
from bench.ingest_shapes import (
    AVRO_MAPPING,
    MAPPING,
    decode_ab,
    produce_avro,
    produce_foreign,
)
from harness.schema_registry import SchemaRegistryServer
from streams.admin import ensure_topics
from streams.avro import AvroConfig
from streams.broker import LocalBroker, free_port
from streams.buffer import EventBuffer
from streams.config import BrokerConfig, BufferConfig, IngestConfig, KafkaConfig, TopicsConfig
from streams.datasets import DriftSpec, synthetic_drift
from streams.events import Event
from streams.ingest import Ingestor, IngestStats
from streams.mapping import MappingConfig
from streams.producer import replay
from streams.segments import Segment


def durable_ingest(
    kafka: KafkaConfig,
    topics: TopicsConfig,
    buf: EventBuffer,
    n: int,
    mapping: MappingConfig | None = None,
    avro: AvroConfig | None = None,
) -> tuple[float, IngestStats]:
    done: list[float] = []
    ing: Ingestor

    def on_flush(seg: Segment, stats: IngestStats) -> None:
        if stats.ingested >= n and not done:
            done.append(time.monotonic())
            ing.stop()

    cfg = IngestConfig(group_id=f"bench-{time.time_ns()}", idle_exit_s=60.0, mapping=mapping,
                       format="avro" if avro else "json", avro=avro)  # fmt: skip
    ing = Ingestor(kafka, topics, cfg, buf, on_flush=on_flush)
    stats = ing.run()
    if not done or stats.first_record_at is None:
        raise RuntimeError(
            f"ingest of {topics.events} stopped after {stats.ingested} of {n} events: {stats}"
        )
    # From the first record (the group join before it is a one-time cost, not throughput) to
    # the last event durable with its offsets committed.
    return stats.ingested / (done[0] - stats.first_record_at), stats


class Topics(NamedTuple):
    """The three topics holding the same events: native JSON, the shop's JSON, the shop's Avro."""

    native: TopicsConfig
    shop: TopicsConfig
    avro: TopicsConfig


def bench_topics(partitions: int) -> Topics:
    return Topics(
        TopicsConfig(events="bench.events", partitions=partitions),
        TopicsConfig(events="bench.shop", dead_letter="bench.shop.dlq", partitions=partitions),
        TopicsConfig(events="bench.avro", dead_letter="bench.avro.dlq", partitions=partitions),
    )


Run = tuple[float, IngestStats, EventBuffer]  # events/s, the member's stats, what it wrote


@dataclass
class Measured:
    """Everything one benchmark run measured; ``report`` prints it."""

    n: int
    partitions: int
    repeats: int
    produce_rate: float = 0.0
    bare: dict[str, float] = field(default_factory=dict)  # kind -> bare poll events/s
    runs: dict[str, list[Run]] = field(default_factory=dict)  # kind -> ingest runs
    jvm: float = 0.0
    lost: dict[str, int] = field(default_factory=dict)  # kind -> events lost
    duplicated: dict[str, int] = field(default_factory=dict)  # kind -> events duplicated
    decoder: dict[int, tuple[float, float, float]] = field(default_factory=dict)

    def best(self, kind: str) -> Run:
        return max(self.runs[kind], key=lambda x: x[0])

    def pair_ratios(self) -> list[float]:
        """Mapped/native events/s per repeat (the two ran back to back)."""
        return [
            m[0] / nat[0] for nat, m in zip(self.runs["native"], self.runs["mapped"], strict=True)
        ]


def produce_all(
    events: list[Event], kafka: KafkaConfig, topics: Topics, registry_url: str, console: Console
) -> float:
    """The events into all three topics; returns the native producer's events/s."""
    n = len(events)
    with console.status(f"producing {n} events"):
        t = time.perf_counter()
        replay(events, kafka, topics.native.events)
        produce_rate = n / (time.perf_counter() - t)
    with console.status(f"producing {n} events in a foreign shape"):
        produce_foreign(events, kafka, topics.shop.events)
    with console.status(f"producing {n} events as Avro"):
        produce_avro(events, kafka, topics.avro.events, registry_url)
    return produce_rate


def ingest_runs(
    m: Measured, kafka: KafkaConfig, topics: Topics, registry_url: str, tmp: Path, console: Console
) -> None:
    """Native, mapped and Avro ingest, alternating, ``m.repeats`` times each, into ``m.runs``."""
    m.runs = {"native": [], "mapped": [], "avro": []}
    avro_cfg = AvroConfig(registry_url=registry_url)
    kinds = (("native", topics.native, None, None), ("mapped", topics.shop, MAPPING, None),
             ("avro", topics.avro, AVRO_MAPPING, avro_cfg))  # fmt: skip
    for r in range(m.repeats):
        for kind, tps, mapping, avro in kinds:
            with console.status(f"durable ingest, {kind} ({r + 1}/{m.repeats})"):
                buf = EventBuffer(BufferConfig(path=tmp / f"buffer-{kind}-{r}"))
                rate, st = durable_ingest(kafka, tps, buf, m.n, mapping, avro)
                m.runs[kind].append((rate, st, buf))


def check_exactly_once(m: Measured, events: list[Event]) -> None:
    """Lost and duplicated events of each kind's best run, into ``m``."""
    ids = m.best("native")[2].read(columns=["event_id"])["event_id"].to_pylist()
    expected = {e.event_id for e in events}
    m.lost["native"] = len(expected - set(ids))
    m.duplicated["native"] = len(ids) - len(set(ids))
    # Mapped and Avro: derived ids are '<topic>:<partition>:<offset>', one per record.
    for kind in ("mapped", "avro"):
        kids = m.best(kind)[2].read(columns=["event_id"])["event_id"].to_pylist()
        m.lost[kind], m.duplicated[kind] = m.n - len(set(kids)), len(kids) - len(set(kids))


def measure(n: int, partitions: int, repeats: int, console: Console) -> Measured:
    """Start a broker and a schema registry, produce, then time every path against the same
    events; the batch decoder alone last, with the broker gone."""
    m = Measured(n, partitions, repeats)
    with tempfile.TemporaryDirectory(prefix="bench-ingest-") as tmp:
        broker_cfg = BrokerConfig(
            port=free_port(), controller_port=free_port(), state_dir=Path(tmp) / "kafka"
        )
        broker = LocalBroker(broker_cfg)
        registry = SchemaRegistryServer(Path(tmp) / "registry")
        with console.status("starting Kafka and the schema registry"):
            broker.up()
            registry.start()
        try:
            kafka = KafkaConfig(bootstrap_servers=broker_cfg.bootstrap)
            topics = bench_topics(partitions)
            for each in topics:
                ensure_topics(kafka, each)
            events = list(synthetic_drift(DriftSpec(events=n, users=2000, seed=1)))
            m.produce_rate = produce_all(events, kafka, topics, registry.url, console)
            with console.status("bare kafka-python poll loop"):
                for kind, tps in zip(("native", "mapped", "avro"), topics, strict=True):
                    m.bare[kind] = bare_poll(kafka, tps.events, partitions, n)
            ingest_runs(m, kafka, topics, registry.url, Path(tmp), console)
            with console.status("Kafka ConsumerPerformance (JVM)"):
                m.jvm = jvm_perf(broker_cfg, topics.native.events, n)
            check_exactly_once(m, events)
        finally:
            registry.stop()
            broker.down()
    with console.status("the batch decoder alone, native and mapped alternating"):
        m.decoder = {poll: decode_ab(events[:20_000], poll, pairs=15) for poll in (500, 5000)}
    return m


def table(m: Measured) -> Table:
    ours, mapped, avro_rate = m.best("native")[0], m.best("mapped")[0], m.best("avro")[0]
    bare, bare_shop, bare_avro = m.bare["native"], m.bare["mapped"], m.bare["avro"]
    t = Table(title=f"ingest, {m.n} events, {m.partitions} partitions, 2-core machine")
    t.add_column("path")
    t.add_column("events/s", justify="right")
    t.add_column("vs bare poll", justify="right")
    t.add_row("streamtune ingest (durable, exactly-once)", f"{ours:,.0f}", f"{ours / bare:.2f}")
    t.add_row(
        "  same, mapped foreign JSON (ingest.mapping)",
        f"{mapped:,.0f}",
        f"{mapped / bare:.2f} ({mapped / bare_shop:.2f} of its own topic's poll)",
    )
    t.add_row(
        "  same, Avro + mapping (ingest.format=avro)",
        f"{avro_rate:,.0f}",
        f"{avro_rate / bare:.2f} ({avro_rate / bare_avro:.2f} of its own topic's poll)",
    )
    for poll, (mid, lo, hi) in m.decoder.items():
        t.add_row(
            f"  decoder alone, mapped/native, {poll}-record polls",
            "",
            f"{mid:.2f} (median of 15; {lo:.2f}-{hi:.2f})",
        )
    t.add_row("bare kafka-python poll loop", f"{bare:,.0f}", "1.00")
    t.add_row("  same, the foreign-shape topic", f"{bare_shop:,.0f}", f"{bare_shop / bare:.2f}")
    t.add_row("  same, the Avro topic", f"{bare_avro:,.0f}", f"{bare_avro / bare:.2f}")
    t.add_row("Kafka ConsumerPerformance (JVM)", f"{m.jvm:,.0f}", f"{m.jvm / bare:.2f}")
    t.add_row("(producer, for reference)", f"{m.produce_rate:,.0f}", "")
    return t


def summary(m: Measured) -> dict[str, object]:
    """The run as the one JSON line every benchmark prints."""
    ours, stats, _ = m.best("native")
    mapped, avro_rate = m.best("mapped")[0], m.best("avro")[0]
    pair_ratios = m.pair_ratios()
    return {
        "events": m.n,
        "events_per_s": round(ours),
        "bare_poll_events_per_s": round(m.bare["native"]),
        "jvm_perf_events_per_s": round(m.jvm),
        "ratio_vs_bare_poll": round(ours / m.bare["native"], 3),
        "mapped_events_per_s": round(mapped),
        "bare_poll_mapped_topic_events_per_s": round(m.bare["mapped"]),
        "ratio_mapped_vs_native": round(mapped / ours, 3),
        "ratio_mapped_vs_native_per_repeat": [round(r, 3) for r in pair_ratios],
        "ratio_mapped_vs_native_median": round(statistics.median(pair_ratios), 3),
        "decoder_mapped_vs_native_median": {
            str(poll): round(mid, 3) for poll, (mid, _, _) in m.decoder.items()
        },
        "native_runs_events_per_s": [round(x[0]) for x in m.runs["native"]],
        "mapped_runs_events_per_s": [round(x[0]) for x in m.runs["mapped"]],
        "mapped_lost": m.lost["mapped"],
        "mapped_duplicated": m.duplicated["mapped"],
        "avro_events_per_s": round(avro_rate),
        "bare_poll_avro_topic_events_per_s": round(m.bare["avro"]),
        "ratio_avro_vs_native": round(avro_rate / ours, 3),
        "avro_runs_events_per_s": [round(x[0]) for x in m.runs["avro"]],
        "avro_lost": m.lost["avro"],
        "avro_duplicated": m.duplicated["avro"],
        "produce_events_per_s": round(m.produce_rate),
        "segments": stats.segments,
        "lost": m.lost["native"],
        "duplicated": m.duplicated["native"],
    }


def report(m: Measured, console: Console) -> None:
    """The table, the exactly-once and ratio lines, then the JSON line."""
    ours, stats, _ = m.best("native")
    mapped, mstats, _ = m.best("mapped")
    avro_rate, astats, _ = m.best("avro")
    console.print(table(m))
    console.print(
        f"segments={stats.segments} lost={m.lost['native']} "
        f"duplicated={m.duplicated['native']} goal: >=0.8 of bare poll"
    )
    console.print(
        f"mapped/native = {mapped / ours:.3f} best of {m.repeats} runs each, "
        f"{statistics.median(m.pair_ratios()):.3f} median per repeat, decoder alone "
        f"{m.decoder[500][0]:.3f} / {m.decoder[5000][0]:.3f} (500 / 5000-record polls) "
        f"(goal >= 0.90); mapped: segments={mstats.segments} "
        f"lost={m.lost['mapped']} duplicated={m.duplicated['mapped']}"
    )
    console.print(
        f"avro/native = {avro_rate / ours:.3f}; avro: segments={astats.segments} "
        f"lost={m.lost['avro']} duplicated={m.duplicated['avro']}"
    )
    print(json.dumps(summary(m)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--events", type=int, default=300_000, help="events to produce and ingest")
    ap.add_argument("--partitions", type=int, default=4)
    ap.add_argument("--quick", action="store_true", help="100k events (about a minute)")
    ap.add_argument(
        "--repeats", type=int, default=2, help="native/mapped ingest runs each (best kept)"
    )
    args = ap.parse_args()
    n = 100_000 if args.quick else args.events
    console = Console()
    report(measure(n, args.partitions, args.repeats, console), console)


if __name__ == "__main__":
    main()
