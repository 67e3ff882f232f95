"""The benchmark's events in a shop's own shapes, and what decoding them costs.

The same events as the native topic, as a shop would publish them: foreign JSON (nested fields,
ISO-8601 times, the shop's own event-type names, no event ids) read through an
``ingest.mapping``, and the same record as Avro in the Confluent wire format. ``decode_ab`` times
the batch decoder alone on both JSON shapes: the mapping's own cost, without the broker.
"""

from __future__ import annotations

import json
import statistics
import time
from datetime import UTC, datetime
from typing import NamedTuple

from streams.avro import frame, parse, register_schema
from streams.codec import decode_batch
from streams.config import KafkaConfig
from streams.events import Event
from streams.mapping import MappingConfig
from streams.producer import make_producer

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
