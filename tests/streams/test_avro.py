"""Avro in the Confluent wire format: a local schema file, and a real schema registry (Apicurio
Registry from Maven Central, started here) with records through a real Kafka topic."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import time
from collections.abc import Iterator
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any
from uuid import UUID

import httpx
import pytest
from kafka import KafkaConsumer, KafkaProducer
from pydantic import ValidationError

from harness.schema_registry import SchemaRegistryServer
from streams.avro import (
    EMPTY,
    FRAMING,
    UNDECODABLE,
    UNKNOWN_SCHEMA,
    UNSUPPORTED_SCHEMA,
    AvroConfig,
    AvroDecoder,
    frame,
    parse,
    register_schema,
    split_reason,
)
from streams.broker import free_port
from streams.config import KafkaConfig, TopicsConfig
from streams.errors import SchemaRegistryError, SchemaRegistryUnavailableError

V1: dict[str, Any] = {
    "type": "record",
    "name": "Action",
    "namespace": "shop",
    "fields": [
        {"name": "uid", "type": "string"},
        {"name": "sku", "type": "string"},
        {"name": "action", "type": {"type": "enum", "name": "Kind", "symbols": ["view", "order"]}},
        {"name": "ts", "type": "long"},
        {"name": "meta", "type": {"type": "map", "values": "string"}},
    ],
}
# v2 adds a field with a default: backward compatible, so the registry accepts it as version 2.
V2: dict[str, Any] = {**V1, "fields": [*V1["fields"], {"name": "qty", "type": "int", "default": 1}]}


def rec(i: int, **extra: Any) -> dict[str, Any]:
    return {"uid": f"u{i}", "sku": f"s{i % 7}", "action": "view", "ts": 1_700_000_000 + i,
            "meta": {"page": "home"}, **extra}  # fmt: skip


def tag(reason: str | None) -> str:
    assert reason is not None
    return split_reason(reason)[0]


@pytest.fixture
def avsc(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    v1, v2 = tmp_path / "v1.avsc", tmp_path / "v2.avsc"
    v1.write_text(json.dumps(V1))
    v2.write_text(json.dumps(V2))
    yield v1, v2


# -- configuration ----------------------------------------------------------------------------
def test_config_wants_exactly_one_source(avsc: tuple[Path, Path], tmp_path: Path) -> None:
    v1, _ = avsc
    with pytest.raises(ValidationError, match="exactly one of registry_url and schema_file"):
        AvroConfig()
    with pytest.raises(ValidationError, match="exactly one of registry_url and schema_file"):
        AvroConfig(registry_url="http://127.0.0.1:1", schema_file=v1)
    with pytest.raises(ValidationError, match=r"schema_id applies only with avro\.schema_file"):
        AvroConfig(registry_url="http://127.0.0.1:1", schema_id=3)
    with pytest.raises(ValidationError, match="must be an http"):
        AvroConfig(registry_url="127.0.0.1:8081")
    with pytest.raises(ValidationError, match=re.escape("avro.schema_file: cannot read")):
        AvroConfig(schema_file=tmp_path / "missing.avsc")
    scalar = tmp_path / "scalar.avsc"
    scalar.write_text('"string"')
    with pytest.raises(ValidationError, match="must be an Avro record schema"):
        AvroConfig(schema_file=scalar)
    bad = tmp_path / "bad.avsc"
    bad.write_text('{"type": "record", "name": "X", "fields": [{"name": "a", "type": "nope"}]}')
    with pytest.raises(ValidationError, match=r"avro\.reader_schema_file is not a valid"):
        AvroConfig(schema_file=v1, reader_schema_file=bad)
    assert AvroConfig(schema_file=v1, schema_id=5).schema_id == 5


# -- local schema file ------------------------------------------------------------------------
def test_file_decodes_and_dead_letters_each_framing_error(avsc: tuple[Path, Path]) -> None:
    v1, _ = avsc
    w = parse(V1)
    good = [frame(11, w, rec(i)) for i in range(3)]
    body = frame(11, w, rec(9))
    bad_utf8 = frame(11, w, {**rec(1), "uid": "\u00e9"}).replace("é".encode(), b"\xff\xfe")
    values: list[bytes | None] = [
        good[0],
        None,  # tombstone
        b"\x00\x00\x01",  # shorter than the header
        json.dumps(rec(1)).encode(),  # JSON, no magic byte
        body[:-4],  # truncated body
        body + b"\x00\x07",  # bytes left over
        bad_utf8,
        good[1],
        good[2],
    ]
    with AvroDecoder(AvroConfig(schema_file=v1)) as dec:
        objs, reasons = dec.decode_values(values)
    assert [tag(r) if r else None for r in reasons] == [
        None, EMPTY, FRAMING, FRAMING, UNDECODABLE, UNDECODABLE, UNDECODABLE, None, None,
    ]  # fmt: skip
    assert [o is None for o in objs] == [r is not None for r in reasons]
    assert objs[0] == rec(0) and objs[7] == rec(1) and objs[8] == rec(2)
    assert "3 bytes, shorter than the 5-byte header" in str(reasons[2])
    assert "first byte is 0x7b" in str(reasons[3])
    assert "2 bytes left over" in str(reasons[5])
    assert "UnicodeDecodeError" in str(reasons[6])


def test_file_schema_id_must_match_when_configured(avsc: tuple[Path, Path]) -> None:
    v1, _ = avsc
    w = parse(V1)
    values: list[bytes | None] = [frame(7, w, rec(1)), frame(8, w, rec(2)), frame(7, w, rec(3))]
    objs, reasons = AvroDecoder(AvroConfig(schema_file=v1, schema_id=7)).decode_values(values)
    assert objs[0] == rec(1) and objs[2] == rec(3) and objs[1] is None
    assert tag(reasons[1]) == UNKNOWN_SCHEMA and "schema id 8 is not avro.schema_id 7" in str(
        reasons[1]
    )
    # Without schema_id any id is accepted: the local file is the writer schema of them all.
    dec = AvroDecoder(AvroConfig(schema_file=v1))
    objs, reasons = dec.decode_values(values)
    assert reasons == [None, None, None] and objs == [rec(1), rec(2), rec(3)]
    assert dec.stats.cache_hits == 3 and dec.stats.registry_fetches == 0


def test_file_reader_schema_resolves_evolution(avsc: tuple[Path, Path]) -> None:
    v1, v2 = avsc
    # Written with v1 (no qty); read as v2: the reader's default fills the field.
    old = frame(1, parse(V1), rec(1))
    dec = AvroDecoder(AvroConfig(schema_file=v1, reader_schema_file=v2))
    objs, reasons = dec.decode_values([old])
    assert reasons == [None] and objs == [rec(1, qty=1)]
    # The other way round: a v2 writer read as v1 drops qty.
    dec = AvroDecoder(AvroConfig(schema_file=v2, reader_schema_file=v1))
    objs, _ = dec.decode_values([frame(2, parse(V2), rec(2, qty=5))])
    assert objs == [rec(2)]


def test_logical_types_plain_by_default_or_converted(tmp_path: Path) -> None:
    schema = {
        "type": "record",
        "name": "Timed",
        "fields": [
            {"name": "ts", "type": {"type": "long", "logicalType": "timestamp-millis"}},
            {"name": "us", "type": {"type": "long", "logicalType": "timestamp-micros"}},
            {"name": "day", "type": {"type": "int", "logicalType": "date"}},
            {"name": "id", "type": {"type": "string", "logicalType": "uuid"}},
        ],
    }
    path = tmp_path / "timed.avsc"
    path.write_text(json.dumps(schema))
    when = datetime(2026, 11, 28, 12, 0, 0, 123000, tzinfo=UTC)
    value = frame(3, parse(schema), {"ts": when, "us": when, "day": when.date(), "id": UUID(int=5)})
    (plain,), _ = AvroDecoder(AvroConfig(schema_file=path)).decode_values([value])
    ms = int(when.timestamp()) * 1000 + 123
    assert plain == {
        "ts": ms, "us": ms * 1000, "day": (when.date() - date(1970, 1, 1)).days,
        "id": "00000000-0000-0000-0000-000000000005",
    }  # fmt: skip
    cfg = AvroConfig(schema_file=path, logical_types=True)
    (converted,), _ = AvroDecoder(cfg).decode_values([value])
    assert converted == {"ts": when, "us": when, "day": when.date(), "id": UUID(int=5)}


def test_file_random_bodies_never_raise(avsc: tuple[Path, Path]) -> None:
    v1, _ = avsc
    rng = random.Random(13)
    values: list[bytes | None] = [
        b"\x00\x00\x00\x00\x01" + rng.randbytes(rng.randint(0, 40)) for _ in range(3000)
    ]
    objs, reasons = AvroDecoder(AvroConfig(schema_file=v1)).decode_values(values)
    undecodable = sum(1 for r in reasons if r is not None and tag(r) == UNDECODABLE)
    decoded = sum(1 for o in objs if o is not None)
    assert undecodable + decoded == len(values)
    assert undecodable > 2500  # random bytes almost never form a v1 datum exactly


# -- a real schema registry (Apicurio Registry, Confluent API) --------------------------------
@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SchemaRegistryServer]:
    with SchemaRegistryServer(tmp_path_factory.mktemp("registry")) as server:
        yield server


@pytest.mark.integration
def test_registry_two_schema_ids_and_cache(registry: SchemaRegistryServer) -> None:
    subject = f"shop-{os.getpid()}-{time.monotonic_ns()}-value"
    id1 = register_schema(registry.url, subject, V1)
    id2 = register_schema(registry.url, subject, V2)
    assert id1 != id2
    w1, w2 = parse(V1), parse(V2)
    batch: list[bytes | None] = [
        frame(id1, w1, rec(0)), frame(id2, w2, rec(1, qty=4)), frame(id1, w1, rec(2)),
        frame(id2, w2, rec(3, qty=2)), frame(id1, w1, rec(4)), frame(id2, w2, rec(5, qty=9)),
    ]  # fmt: skip
    with AvroDecoder(AvroConfig(registry_url=registry.url)) as dec:
        objs, reasons = dec.decode_values(batch)
        assert reasons == [None] * 6
        # Each record keeps its writer's shape: v1 records have no qty.
        assert objs == [rec(0), rec(1, qty=4), rec(2), rec(3, qty=2), rec(4), rec(5, qty=9)]
        assert (dec.stats.registry_fetches, dec.stats.cache_hits) == (2, 4)
        dec.decode_values(batch)
        assert (dec.stats.registry_fetches, dec.stats.cache_hits) == (2, 10)

    # A cache of one schema: alternating ids evict each other, so every record fetches.
    with AvroDecoder(AvroConfig(registry_url=registry.url, cache_size=1)) as dec:
        dec.decode_values(batch)
        assert (dec.stats.registry_fetches, dec.stats.cache_hits) == (6, 0)


@pytest.mark.integration
def test_registry_reader_schema_gives_one_shape(
    registry: SchemaRegistryServer, avsc: tuple[Path, Path]
) -> None:
    _, v2 = avsc
    subject = f"shape-{time.monotonic_ns()}-value"
    id1 = register_schema(registry.url, subject, V1)
    id2 = register_schema(registry.url, subject, V2)
    cfg = AvroConfig(registry_url=registry.url, reader_schema_file=v2)
    batch: list[bytes | None] = [
        frame(id1, parse(V1), rec(0)),
        frame(id2, parse(V2), rec(1, qty=3)),
    ]
    objs, reasons = AvroDecoder(cfg).decode_values(batch)
    assert reasons == [None, None] and objs == [rec(0, qty=1), rec(1, qty=3)]


@pytest.mark.integration
def test_registry_unknown_id_is_dead_lettered_with_one_request(
    registry: SchemaRegistryServer,
) -> None:
    subject = f"unknown-{time.monotonic_ns()}-value"
    known = register_schema(registry.url, subject, V1)
    w = parse(V1)
    missing = 900_000 + known
    batch: list[bytes | None] = [frame(missing, w, rec(i)) for i in range(3)]
    batch.append(frame(known, w, rec(3)))
    dec = AvroDecoder(AvroConfig(registry_url=registry.url))
    objs, reasons = dec.decode_values(batch)
    assert [tag(r) for r in reasons[:3]] == [UNKNOWN_SCHEMA] * 3
    assert f"the schema registry has no schema id {missing}" in str(reasons[0])
    assert reasons[3] is None and objs[3] == rec(3)
    assert dec.stats.registry_fetches == 2  # one for the missing id, one for the known one
    dec.decode_values(batch[:1])  # a later poll asks again: the id may have been registered
    assert dec.stats.registry_fetches == 3


@pytest.mark.integration
def test_registry_non_avro_schema_is_unsupported(registry: SchemaRegistryServer) -> None:
    resp = httpx.post(
        f"{registry.url}/subjects/json-{time.monotonic_ns()}-value/versions",
        json={
            "schemaType": "JSON",
            "schema": json.dumps(
                {"$schema": "http://json-schema.org/draft-07/schema#", "type": "object"}
            ),
        },
        headers={"Content-Type": "application/vnd.schemaregistry.v1+json"},
        timeout=5,
    )
    assert resp.status_code == 200, resp.text
    sid = int(resp.json()["id"])
    # Bytes that would decode under V1: only the schema's type can refuse them.
    objs, reasons = AvroDecoder(AvroConfig(registry_url=registry.url)).decode_values(
        [frame(sid, parse(V1), rec(1))]
    )
    assert objs == [None] and tag(reasons[0]) == UNSUPPORTED_SCHEMA
    assert "JSON schema, not Avro" in str(reasons[0])


@pytest.mark.integration
def test_registry_wrong_path_is_a_config_error(registry: SchemaRegistryServer) -> None:
    # The server root instead of the ccompat API root: 404 without the API's 40403 code.
    frame_ = frame(1, parse(V1), rec(1))
    with pytest.raises(SchemaRegistryError, match=re.escape("check avro.registry_url")) as err:
        AvroDecoder(AvroConfig(registry_url=registry.base)).decode_values([frame_])
    assert not isinstance(err.value, SchemaRegistryUnavailableError)


def test_registry_refusing_connections_is_an_outage() -> None:
    port = free_port()  # nothing listens there
    dec = AvroDecoder(AvroConfig(registry_url=f"http://127.0.0.1:{port}", request_timeout_s=2))
    with pytest.raises(SchemaRegistryUnavailableError, match="did not answer for schema id 1"):
        dec.decode_values([frame(1, parse(V1), rec(1))])


@pytest.mark.integration
def test_registry_frozen_is_an_outage_then_recovers(registry: SchemaRegistryServer) -> None:
    subject = f"frozen-{time.monotonic_ns()}-value"
    sid = register_schema(registry.url, subject, V1)
    batch: list[bytes | None] = [frame(sid, parse(V1), rec(1))]
    dec = AvroDecoder(AvroConfig(registry_url=registry.url, request_timeout_s=1.0))
    assert registry.proc is not None
    pid = registry.proc.pid
    os.kill(pid, signal.SIGSTOP)
    try:
        assert _stopped(pid)  # the fault happened
        t0 = time.monotonic()
        with pytest.raises(SchemaRegistryUnavailableError, match="ReadTimeout"):
            dec.decode_values(batch)
        assert time.monotonic() - t0 < 5
    finally:
        os.kill(pid, signal.SIGCONT)
    # Nothing was dead-lettered or cached; the same poll decodes once the registry is back.
    objs, reasons = dec.decode_values(batch)
    assert reasons == [None] and objs == [rec(1)]


def _stopped(pid: int, within_s: float = 5.0) -> bool:
    """Whether ``pid`` reaches the stopped state ("T"); SIGSTOP is delivered asynchronously."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if Path(f"/proc/{pid}/stat").read_text().split()[2] == "T":
            return True
        time.sleep(0.02)
    return False


@pytest.mark.integration
@pytest.mark.slow
def test_kafka_topic_of_confluent_framed_records(
    registry: SchemaRegistryServer, kafka: KafkaConfig, topics: TopicsConfig
) -> None:
    """Producer -> real Kafka topic -> consumer -> decoder, with schemas from the registry."""
    subject = f"{topics.events}-value"
    id1 = register_schema(registry.url, subject, V1)
    id2 = register_schema(registry.url, subject, V2)
    w1, w2 = parse(V1), parse(V2)
    sent: list[bytes] = []
    for i in range(40):
        sent.append(frame(id2, w2, rec(i, qty=i)) if i % 2 else frame(id1, w1, rec(i)))
    sent.insert(10, frame(id1 + 777_000, w1, rec(99)))  # an id the registry never gave out
    sent.insert(20, b"\x01" + sent[0][1:])  # wrong magic byte
    producer = KafkaProducer(bootstrap_servers=kafka.bootstrap_servers, acks="all")
    for value in sent:
        producer.send(topics.events, value=value, partition=0)
    producer.flush()
    producer.close()

    consumer = KafkaConsumer(
        topics.events,
        bootstrap_servers=kafka.bootstrap_servers,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        consumer_timeout_ms=10_000,
    )
    got: list[bytes | None] = []
    deadline = time.monotonic() + 30
    while len(got) < len(sent) and time.monotonic() < deadline:
        for records in consumer.poll(timeout_ms=1000).values():
            got.extend(r.value for r in records)
    consumer.close()
    assert got == sent

    with AvroDecoder(AvroConfig(registry_url=registry.url)) as dec:
        objs, reasons = dec.decode_values(got)
    assert tag(reasons[10]) == UNKNOWN_SCHEMA and tag(reasons[20]) == FRAMING
    good = [o for o in objs if o is not None]
    assert good == [rec(i, qty=i) if i % 2 else rec(i) for i in range(40)]
    assert dec.stats.registry_fetches == 3


@pytest.mark.integration
@pytest.mark.slow
def test_avro_topic_ingested_through_a_mapping(
    registry: SchemaRegistryServer, kafka: KafkaConfig, topics: TopicsConfig, tmp_path: Path
) -> None:
    """ingest.format=avro end to end: framed records of two schema versions, in a shop's own
    shape, ingested exactly once through ingest.mapping; bad framing and unknown ids are
    dead-lettered with the Avro step's reasons, the rest of the poll goes on."""
    from streams.admin import ensure_topics
    from streams.buffer import EventBuffer
    from streams.config import BufferConfig
    from streams.mapping import MappingConfig
    from tests.streams.test_ingest_kafka import ingest_once

    ensure_topics(kafka, topics)
    subject = f"{topics.events}-value"
    id1 = register_schema(registry.url, subject, V1)
    id2 = register_schema(registry.url, subject, V2)
    w1, w2 = parse(V1), parse(V2)
    producer = KafkaProducer(bootstrap_servers=kafka.bootstrap_servers, acks="all")
    good: dict[tuple[int, int], dict[str, Any]] = {}  # (partition, offset) -> record
    bad: list[tuple[str, int, int]] = []
    for i in range(400):
        r = rec(i, action="order" if i % 3 == 0 else "view")
        value = frame(id2, w2, {**r, "qty": 2}) if i % 2 else frame(id1, w1, r)
        reason = None
        if i % 97 == 5:
            value, reason = frame(id1 + 777_000, w1, r), UNKNOWN_SCHEMA
        elif i % 97 == 50:
            value, reason = b"\x01" + value[1:], FRAMING
        meta = producer.send(topics.events, key=r["uid"].encode(), value=value).get(timeout=30)
        if reason is None:
            good[(meta.partition, meta.offset)] = r
        else:
            bad.append((reason, meta.partition, meta.offset))
    producer.close()
    mapping = MappingConfig(
        user="uid", item="sku", event_type="action",
        event_types={"view": "view", "order": "purchase"}, ts="ts", ts_format="epoch_s",
    )  # fmt: skip
    buf = EventBuffer(BufferConfig(path=tmp_path / "buf"))
    ing = ingest_once(kafka, topics, buf, format="avro", mapping=mapping,
                      avro=AvroConfig(registry_url=registry.url))  # fmt: skip
    assert ing.stats.dead_letter_total == len(bad) > 0

    # Exactly once, by derived id and by position; the dead letters' offsets are covered too.
    ids = {f"{topics.events}:{p}:{o}" for p, o in good}
    table = buf.read()
    assert sorted(table["event_id"].to_pylist()) == sorted(ids)
    for row in table.to_pylist():
        r = good[(row["partition"], row["offset"])]
        assert (row["user_id"], row["item_id"], row["ts"]) == (r["uid"], r["sku"], r["ts"] * 1000)
        assert row["event_type"] == ("purchase" if r["action"] == "order" else "view")
    # The dead letters' offsets count as consumed: the watermark covers every record.
    assert sum(buf.watermark().values()) == len(good) + len(bad)

    consumer = KafkaConsumer(topics.dead_letter, bootstrap_servers=kafka.bootstrap_servers,
                             auto_offset_reset="earliest", consumer_timeout_ms=10_000)  # fmt: skip
    dead = []
    for m in consumer:
        h = {k: v.decode() for k, v in m.headers}
        dead.append((h["reason"], int(h["source_partition"]), int(h["source_offset"])))
    consumer.close()
    assert sorted(dead) == sorted(bad)
