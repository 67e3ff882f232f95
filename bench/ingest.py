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
import subprocess
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import NamedTuple

from kafka import KafkaConsumer, TopicPartition
from rich.console import Console
from rich.table import Table

from streams.admin import ensure_topics
from streams.avro import AvroConfig, frame, parse, register_schema
from streams.broker import LocalBroker, free_port, java_cmd
from streams.buffer import EventBuffer
from streams.codec import decode_batch
from streams.config import BrokerConfig, BufferConfig, IngestConfig, KafkaConfig, TopicsConfig
from streams.datasets import DriftSpec, synthetic_drift
from streams.events import Event
from streams.ingest import Ingestor, IngestStats
from streams.mapping import MappingConfig
from streams.producer import make_producer, replay
from streams.schema_registry import SchemaRegistryServer
from streams.segments import Segment

# The foreign shape's event-type names, and the mapping that reads it.
SHOP_TYPES = {
    "view": "page_view", "click": "click", "cart": "add_to_cart", "purchase": "order",
    "rating": "rate",
}  # fmt: skip
MAPPING = MappingConfig(
    user="customer.uid",
    item="product.sku",
    item_text="product.title",
    event_type="action",
    event_types={theirs: ours for ours, theirs in SHOP_TYPES.items()},
    value="amount",
    ts="occurred_at",
    ts_format="iso8601",
)


def foreign(e: Event) -> bytes:
    """``e`` as a shop would publish it: nested, ISO-8601 in UTC, its own names, no event id."""
    when = datetime.fromtimestamp(e.ts / 1000, UTC).isoformat(timespec="milliseconds")
    record = {
        "customer": {"uid": e.user_id},
        "product": {"sku": e.item_id, "title": e.item_text},
        "action": SHOP_TYPES[e.event_type.value],
        "occurred_at": when.replace("+00:00", "Z"),
        "amount": e.value,
    }
    return json.dumps(record, separators=(",", ":")).encode()


AVRO_SCHEMA = {
    "type": "record", "name": "ShopEvent", "namespace": "shop",
    "fields": [
        {"name": "customer", "type": {"type": "record", "name": "Customer",
                                      "fields": [{"name": "uid", "type": "string"}]}},
        {"name": "product", "type": {"type": "record", "name": "Product", "fields": [
            {"name": "sku", "type": "string"},
            {"name": "title", "type": ["null", "string"], "default": None}]}},
        {"name": "action", "type": "string"},
        {"name": "occurred_at", "type": {"type": "long", "logicalType": "timestamp-millis"}},
        {"name": "amount", "type": "double"},
    ],
}  # fmt: skip
AVRO_MAPPING = MAPPING.model_copy(update={"ts_format": "epoch_ms"})


def produce_avro(events: list[Event], kafka: KafkaConfig, topic: str, registry_url: str) -> None:
    schema_id = register_schema(registry_url, f"{topic}-value", AVRO_SCHEMA)
    writer = parse(AVRO_SCHEMA)
    producer = make_producer(kafka)
    try:
        for e in events:
            record = {
                "customer": {"uid": e.user_id},
                "product": {"sku": e.item_id, "title": e.item_text},
                "action": SHOP_TYPES[e.event_type.value],
                "occurred_at": e.ts,
                "amount": e.value,
            }
            producer.send(topic, key=e.key(), value=frame(schema_id, writer, record))
        producer.flush(timeout=120)
    finally:
        producer.close(timeout=30)


def produce_foreign(events: list[Event], kafka: KafkaConfig, topic: str) -> None:
    producer = make_producer(kafka)
    try:
        for e in events:
            producer.send(topic, key=e.key(), value=foreign(e))
        producer.flush(timeout=120)
    finally:
        producer.close(timeout=30)


class _Origin(NamedTuple):
    """Where a record came from, as the decoder reads it off kafka-python's ConsumerRecord."""

    topic: str
    partition: int
    offset: int
    key: bytes | None


def decode_ab(events: list[Event], poll: int, pairs: int) -> tuple[float, float, float]:
    """(median, lowest, highest) of mapped/native decoding throughput: the batch decoder alone
    on the same events as native JSON and in the foreign shape, ``poll`` records a call, the two
    timed alternately ``pairs`` times (which goes first alternates too)."""
    native = [e.encode() for e in events]
    shop = [foreign(e) for e in events]
    origins = [_Origin("bench.shop", 0, i, e.key()) for i, e in enumerate(events)]

    def seconds(mapped: bool) -> float:
        t = time.perf_counter()
        for s in range(0, len(events), poll):
            if mapped:
                decode_batch(shop[s : s + poll], MAPPING, origins[s : s + poll])
            else:
                decode_batch(native[s : s + poll])
        return time.perf_counter() - t

    ratios = []
    for i in range(pairs):
        order = (True, False) if i % 2 else (False, True)
        took = {mapped: seconds(mapped) for mapped in order}
        ratios.append(took[False] / took[True])
    return statistics.median(ratios), min(ratios), max(ratios)


def bare_poll(kafka: KafkaConfig, topic: str, partitions: int, n: int) -> float:
    """events/s of a kafka-python loop that polls and touches each value, nothing else."""
    consumer = KafkaConsumer(
        **kafka.client_kwargs(),
        group_id=None,
        enable_auto_commit=False,
        max_poll_records=5000,
        max_partition_fetch_bytes=8 << 20,
        fetch_max_bytes=64 << 20,
    )
    tps = [TopicPartition(topic, p) for p in range(partitions)]
    consumer.assign(tps)
    consumer.seek_to_beginning(*tps)
    seen = 0
    nbytes = 0
    t0 = None
    while seen < n:
        for msgs in consumer.poll(timeout_ms=1000).values():
            if t0 is None:  # from the first record, as for ingest (no group join in either)
                t0 = time.monotonic()
            for m in msgs:
                nbytes += len(m.value)
            seen += len(msgs)
    dt = time.monotonic() - (t0 or 0.0)
    consumer.close()
    return seen / dt


def jvm_perf(broker: BrokerConfig, topic: str, n: int) -> float:
    """events/s of Kafka's own ConsumerPerformance tool on the same topic."""
    cmd = java_cmd(
        broker, "org.apache.kafka.tools.ConsumerPerformance",
        "--bootstrap-server", broker.bootstrap, "--topic", topic, "--messages", str(n),
        "--group", f"perf-{time.time_ns()}", "--timeout", "60000",
        heap="512m",
    )  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    # Header then one CSV row: start.time, end.time, MB, MB.sec, nMsg, nMsg.sec, ...
    header, row = next(
        (lines[i], lines[i + 1])
        for lines in [out.strip().splitlines()]
        for i in range(len(lines) - 1)
        if "nMsg.sec" in lines[i]
    )
    cols = [c.strip() for c in header.split(",")]
    vals = [v.strip() for v in row.split(",")]
    return float(vals[cols.index("nMsg.sec")])


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
            topics = TopicsConfig(events="bench.events", partitions=args.partitions)
            shop = TopicsConfig(
                events="bench.shop", dead_letter="bench.shop.dlq", partitions=args.partitions
            )
            avro_topics = TopicsConfig(
                events="bench.avro", dead_letter="bench.avro.dlq", partitions=args.partitions
            )
            for each in (topics, shop, avro_topics):
                ensure_topics(kafka, each)
            events = list(synthetic_drift(DriftSpec(events=n, users=2000, seed=1)))
            with console.status(f"producing {n} events"):
                t = time.perf_counter()
                replay(events, kafka, topics.events)
                produce_rate = n / (time.perf_counter() - t)
            with console.status(f"producing {n} events in a foreign shape"):
                produce_foreign(events, kafka, shop.events)
            with console.status(f"producing {n} events as Avro"):
                produce_avro(events, kafka, avro_topics.events, registry.url)
            with console.status("bare kafka-python poll loop"):
                bare = bare_poll(kafka, topics.events, args.partitions, n)
                bare_shop = bare_poll(kafka, shop.events, args.partitions, n)
                bare_avro = bare_poll(kafka, avro_topics.events, args.partitions, n)
            runs: dict[str, list[tuple[float, IngestStats, EventBuffer]]] = {
                "native": [],
                "mapped": [],
                "avro": [],
            }
            avro_cfg = AvroConfig(registry_url=registry.url)
            kinds = (("native", topics, None, None), ("mapped", shop, MAPPING, None),
                     ("avro", avro_topics, AVRO_MAPPING, avro_cfg))  # fmt: skip
            for r in range(args.repeats):
                for kind, tps, mapping, avro in kinds:
                    with console.status(f"durable ingest, {kind} ({r + 1}/{args.repeats})"):
                        buf = EventBuffer(BufferConfig(path=Path(tmp) / f"buffer-{kind}-{r}"))
                        rate, st = durable_ingest(kafka, tps, buf, n, mapping, avro)
                        runs[kind].append((rate, st, buf))
            ours, stats, buf = max(runs["native"], key=lambda x: x[0])
            mapped, mstats, mbuf = max(runs["mapped"], key=lambda x: x[0])
            avro_rate, astats, abuf = max(runs["avro"], key=lambda x: x[0])
            with console.status("Kafka ConsumerPerformance (JVM)"):
                jvm = jvm_perf(broker_cfg, topics.events, n)
            ids = buf.read(columns=["event_id"])["event_id"].to_pylist()
            expected = {e.event_id for e in events}
            lost = len(expected - set(ids))
            duplicated = len(ids) - len(set(ids))
            # Mapped: derived ids are '<topic>:<partition>:<offset>', one per record.
            mids = mbuf.read(columns=["event_id"])["event_id"].to_pylist()
            mapped_lost = n - len(set(mids))
            mapped_duplicated = len(mids) - len(set(mids))
            aids = abuf.read(columns=["event_id"])["event_id"].to_pylist()
            avro_lost, avro_duplicated = n - len(set(aids)), len(aids) - len(set(aids))
        finally:
            registry.stop()
            broker.down()
    with console.status("the batch decoder alone, native and mapped alternating"):
        decoder = {poll: decode_ab(events[:20_000], poll, pairs=15) for poll in (500, 5000)}
    pair_ratios = [m[0] / nat[0] for nat, m in zip(runs["native"], runs["mapped"], strict=True)]

    table = Table(title=f"ingest, {n} events, {args.partitions} partitions, 2-core machine")
    table.add_column("path")
    table.add_column("events/s", justify="right")
    table.add_column("vs bare poll", justify="right")
    table.add_row("streamtune ingest (durable, exactly-once)", f"{ours:,.0f}", f"{ours / bare:.2f}")
    table.add_row(
        "  same, mapped foreign JSON (ingest.mapping)",
        f"{mapped:,.0f}",
        f"{mapped / bare:.2f} ({mapped / bare_shop:.2f} of its own topic's poll)",
    )
    table.add_row(
        "  same, Avro + mapping (ingest.format=avro)",
        f"{avro_rate:,.0f}",
        f"{avro_rate / bare:.2f} ({avro_rate / bare_avro:.2f} of its own topic's poll)",
    )
    for poll, (mid, lo, hi) in decoder.items():
        table.add_row(
            f"  decoder alone, mapped/native, {poll}-record polls",
            "",
            f"{mid:.2f} (median of 15; {lo:.2f}-{hi:.2f})",
        )
    table.add_row("bare kafka-python poll loop", f"{bare:,.0f}", "1.00")
    table.add_row("  same, the foreign-shape topic", f"{bare_shop:,.0f}", f"{bare_shop / bare:.2f}")
    table.add_row("  same, the Avro topic", f"{bare_avro:,.0f}", f"{bare_avro / bare:.2f}")
    table.add_row("Kafka ConsumerPerformance (JVM)", f"{jvm:,.0f}", f"{jvm / bare:.2f}")
    table.add_row("(producer, for reference)", f"{produce_rate:,.0f}", "")
    console.print(table)
    console.print(
        f"segments={stats.segments} lost={lost} duplicated={duplicated} goal: >=0.8 of bare poll"
    )
    console.print(
        f"mapped/native = {mapped / ours:.3f} best of {args.repeats} runs each, "
        f"{statistics.median(pair_ratios):.3f} median per repeat, decoder alone "
        f"{decoder[500][0]:.3f} / {decoder[5000][0]:.3f} (500 / 5000-record polls) "
        f"(goal >= 0.90); mapped: segments={mstats.segments} "
        f"lost={mapped_lost} duplicated={mapped_duplicated}"
    )
    console.print(
        f"avro/native = {avro_rate / ours:.3f}; avro: segments={astats.segments} "
        f"lost={avro_lost} duplicated={avro_duplicated}"
    )
    print(
        json.dumps(
            {
                "events": n,
                "events_per_s": round(ours),
                "bare_poll_events_per_s": round(bare),
                "jvm_perf_events_per_s": round(jvm),
                "ratio_vs_bare_poll": round(ours / bare, 3),
                "mapped_events_per_s": round(mapped),
                "bare_poll_mapped_topic_events_per_s": round(bare_shop),
                "ratio_mapped_vs_native": round(mapped / ours, 3),
                "ratio_mapped_vs_native_per_repeat": [round(r, 3) for r in pair_ratios],
                "ratio_mapped_vs_native_median": round(statistics.median(pair_ratios), 3),
                "decoder_mapped_vs_native_median": {
                    str(poll): round(mid, 3) for poll, (mid, _, _) in decoder.items()
                },
                "native_runs_events_per_s": [round(x[0]) for x in runs["native"]],
                "mapped_runs_events_per_s": [round(x[0]) for x in runs["mapped"]],
                "mapped_lost": mapped_lost,
                "mapped_duplicated": mapped_duplicated,
                "avro_events_per_s": round(avro_rate),
                "bare_poll_avro_topic_events_per_s": round(bare_avro),
                "ratio_avro_vs_native": round(avro_rate / ours, 3),
                "avro_runs_events_per_s": [round(x[0]) for x in runs["avro"]],
                "avro_lost": avro_lost,
                "avro_duplicated": avro_duplicated,
                "produce_events_per_s": round(produce_rate),
                "segments": stats.segments,
                "lost": lost,
                "duplicated": duplicated,
            }
        )
    )


if __name__ == "__main__":
    main()
