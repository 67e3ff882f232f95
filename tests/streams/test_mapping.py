"""Input mapping: foreign JSON records read into the event contract, batch path = record path."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from kafka import KafkaConsumer
from pydantic import ValidationError

from streams.admin import end_offsets, ensure_topics
from streams.buffer import EventBuffer
from streams.codec import EVENT_COLUMNS, decode_batch
from streams.config import BufferConfig, IngestConfig, KafkaConfig, TopicsConfig
from streams.events import DecodeError
from streams.mapping import UNMAPPED, MappingConfig, derived_event_id, epoch_ms, map_record
from streams.producer import make_producer
from tests.streams.test_ingest_kafka import _ingest_subprocess, _logs, ingest_once

TOPIC, PARTITION = "shop.events", 3


@dataclass(frozen=True)
class Rec:
    topic: str
    partition: int
    offset: int
    key: bytes | None


FOREIGN = MappingConfig(
    user="user.id",
    item="product.sku",
    event_type="action",
    event_types={"page_view": "view", "add_to_cart": "cart", "order": "purchase"},
    value="amount",
    ts="occurred_at",
    ts_format="iso8601",
    item_text="product.title",
    context="meta",
)


def foreign(i: int, rng: random.Random) -> dict[str, Any]:
    zone = rng.choice(["Z", "+01:00", "-05:30", "+00:00"])
    frac = rng.choice(["", ".5", ".250", ".123456789"])
    rec: dict[str, Any] = {
        "user": {"id": f"u{rng.randrange(50)}", "country": "fr"},
        "product": {"sku": f"sku-{rng.randrange(300)}", "title": f"thing {i}"},
        "action": rng.choice(["page_view", "add_to_cart", "order"]),
        "occurred_at": f"2026-0{rng.randrange(1, 10)}-1{rng.randrange(10)}T1{rng.randrange(10)}"
        f":{rng.randrange(60):02d}:{rng.randrange(60):02d}{frac}{zone}",
        "session": {"n": i, "tags": ["a", i]},
    }
    if rng.random() < 0.5:
        rec["amount"] = rng.choice([1, 2.5, 3])
    return rec


def records(n: int, keys: list[bytes | None] | None = None) -> list[Rec]:
    return [Rec(TOPIC, PARTITION, 100 + i, keys[i] if keys else b"k") for i in range(n)]


def reference(cfg: MappingConfig, values: list[bytes | None], recs: list[Rec]) -> tuple[Any, ...]:
    """What map_record makes of each record: rows (position, columns), refusals, drops."""
    rows, errors, dropped = [], [], []
    for i, (v, r) in enumerate(zip(values, recs, strict=True)):
        try:
            e = map_record(cfg, v, r.key, r.topic, r.partition, r.offset)
        except DecodeError as err:
            errors.append((i, err.reason, err.detail))
            continue
        if e is None:
            dropped.append(i)
        else:
            rows.append((i, e.columns()))
    return rows, errors, dropped


def batch(cfg: MappingConfig, values: list[bytes | None], recs: list[Rec]) -> tuple[Any, ...]:
    d = decode_batch(values, cfg, recs)
    rows = [(r["index"], {k: r[k] for k in EVENT_COLUMNS}) for r in d.table.to_pylist()]
    return rows, [(i, e.reason, e.detail) for i, e in d.errors], d.dropped


def encode(recs: list[dict[str, Any]]) -> list[bytes | None]:
    return [json.dumps(r).encode() for r in recs]


def test_nested_foreign_records_map_to_events() -> None:
    raw = {
        "user": {"id": "alice"},
        "product": {"sku": "sku-9", "title": "Red shoes"},
        "action": "add_to_cart",
        "occurred_at": "2026-03-01T10:00:00.250+01:00",
        "amount": 2,
        "meta": {"device": "ios", "page": 3},
        "ignored": {"deep": [1, 2]},
    }
    e = map_record(FOREIGN, json.dumps(raw).encode(), None, TOPIC, PARTITION, 41)
    assert e is not None
    assert (e.user_id, e.item_id, e.event_type.value, e.value) == ("alice", "sku-9", "cart", 2.0)
    assert e.ts == int(datetime(2026, 3, 1, 9, 0, 0, 250000, tzinfo=UTC).timestamp() * 1000)
    assert e.item_text == "Red shoes" and e.context == {"device": "ios", "page": 3}
    assert e.event_id == f"{TOPIC}:{PARTITION}:41"
    # The batch path gives the same row.
    got = batch(FOREIGN, [json.dumps(raw).encode()], [Rec(TOPIC, PARTITION, 41, None)])
    assert got[0] == [(0, e.columns())]


def test_plain_foreign_records_take_the_fast_path_with_the_same_rows() -> None:
    rng = random.Random(5)
    values = encode([foreign(i, rng) for i in range(2000)])
    recs = records(len(values))
    d = decode_batch(values, FOREIGN.model_copy(update={"context": None}), recs)
    assert d.one_by_one == 0 and not d.errors and d.table.num_rows == 2000
    assert batch(FOREIGN, values, recs) == reference(FOREIGN, values, recs)


@pytest.mark.parametrize(
    ("fmt", "raw", "ms"),
    [
        ("epoch_s", 1_700_000_000, 1_700_000_000_000),
        ("epoch_s", 1_700_000_000.1234, 1_700_000_000_123),
        ("epoch_s", 0.0005, 0),  # half to even
        ("epoch_ms", 1_700_000_000_123, 1_700_000_000_123),
        ("epoch_ms", 1_700_000_000_123.5, 1_700_000_000_124),
        ("epoch_us", 1_700_000_000_123_999, 1_700_000_000_123),
        ("iso8601", "2023-11-14T22:13:20Z", 1_700_000_000_000),
        ("iso8601", "2023-11-14T22:13:20.123456789Z", 1_700_000_000_123),
        ("iso8601", "2023-11-14T23:13:20.5+01:00", 1_700_000_000_500),
        ("iso8601", "2023-11-14T16:43:20-05:30", 1_700_000_000_000),
        ("iso8601", "2023-11-14T22:13:20+00:00", 1_700_000_000_000),
        ("iso8601", "2023-11-14 22:13:20+0000", 1_700_000_000_000),  # record path only
    ],
)
def test_timestamp_formats(fmt: str, raw: Any, ms: int) -> None:
    assert epoch_ms(raw, fmt) == ms
    cfg = FOREIGN.model_copy(update={"ts_format": fmt})
    value = json.dumps({**foreign(0, random.Random(0)), "occurred_at": raw}).encode()
    rows, errors, _ = batch(cfg, [value], records(1))
    assert not errors and rows[0][1]["ts"] == ms


@pytest.mark.parametrize(
    ("fmt", "raw", "why"),
    [
        ("iso8601", "2023-11-14T22:13:20", "without a zone"),
        ("iso8601", "2023-02-30T22:13:20Z", "not an ISO-8601"),
        ("iso8601", 1_700_000_000, "expected an ISO-8601 string"),
        ("epoch_ms", "1700000000000", "expected a number"),
        ("epoch_s", True, "expected a number"),
    ],
)
def test_bad_timestamps_are_dead_lettered_with_the_reason(fmt: str, raw: Any, why: str) -> None:
    cfg = FOREIGN.model_copy(update={"ts_format": fmt})
    value = json.dumps({**foreign(0, random.Random(0)), "occurred_at": raw}).encode()
    rows, errors, _ = batch(cfg, [value], records(1))
    assert not rows and errors[0][1] == "schema" and why in errors[0][2]


ISO_DATES = ["2026-01-01", "2024-02-29", "2023-02-29", "20260101", "0000-01-01", "2026-13-01"]
ISO_TIMES = [
    *("", "T00", "T12:30", "T12:30:45", " 12:30:45", "t12:30:45", "T12:30:45.1", "T12:30:45.123"),
    *("T12:30:45.1234", "T12:30:45,123", "T24:00:00", "T12:30:60"),
]
ISO_ZONES = ["", "Z", "z", "+00:00", "-05:30", "+05", "+0530", "+05:30:15", "+24:00", " Z", "UTC"]


@pytest.mark.parametrize("day", ISO_DATES)
def test_every_iso_form_alone_in_a_poll_is_judged_as_the_record_path_judges_it(day: str) -> None:
    """A poll of one form takes the batch path's quickest road (Arrow's own ISO-8601 cast) when
    Arrow reads it: whatever Arrow reads must give the instant fromisoformat gives, or be
    refused as it is."""
    for at in ISO_TIMES:
        for zone in ISO_ZONES:
            value = json.dumps({**foreign(0, random.Random(0)), "occurred_at": day + at + zone})
            values: list[bytes | None] = [value.encode()] * 3
            assert batch(FOREIGN, values, records(3)) == reference(FOREIGN, values, records(3))


def test_derived_ids_follow_offsets_with_gaps() -> None:
    """Compaction and transaction markers leave gaps in a partition's offsets."""
    values = encode([foreign(i, random.Random(i)) for i in range(6)])
    recs = [Rec(TOPIC, PARTITION, o, b"k") for o in (7, 8, 10, 11, 15, 16)]
    assert batch(FOREIGN, values, recs) == reference(FOREIGN, values, recs)
    rows, _, _ = batch(FOREIGN, values, recs)
    assert [r["event_id"].rsplit(":", 1)[1] for _, r in rows] == ["7", "8", "10", "11", "15", "16"]


def test_unmapped_types_are_dead_lettered_or_dropped_by_choice() -> None:
    rng = random.Random(2)
    recs_ = [foreign(i, rng) for i in range(200)]
    for r in recs_[::7]:
        r["action"] = "wishlist"
    values = encode(recs_)
    recs = records(len(values))
    rows, errors, dropped = batch(FOREIGN, values, recs)
    assert [i for i, *_ in errors] == list(range(0, 200, 7)) and not dropped
    assert {reason for _, reason, _ in errors} == {UNMAPPED}
    assert "'wishlist' is not in ingest.mapping.event_types" in errors[0][2]
    assert len(rows) == 200 - len(errors)
    dropping = FOREIGN.model_copy(update={"unmapped_types": "drop"})
    rows2, errors2, dropped2 = batch(dropping, values, recs)
    assert not errors2 and dropped2 == list(range(0, 200, 7)) and rows2 == rows
    assert (rows2, errors2, dropped2) == reference(dropping, values, recs)


def test_derived_event_ids_are_deterministic() -> None:
    rng = random.Random(3)
    values = encode([foreign(i, rng) for i in range(50)])
    recs = records(50)
    a, b = decode_batch(values, FOREIGN, recs), decode_batch(values, FOREIGN, recs)
    ids = a.table["event_id"].to_pylist()
    assert (
        ids
        == b.table["event_id"].to_pylist()
        == [f"{TOPIC}:{PARTITION}:{100 + i}" for i in range(50)]
    )
    # A long topic name is hashed, so the id stays within the contract's 128 characters.
    long = derived_event_id("t" * 249, 7, 2**62)
    assert len(long) <= 128 and long == derived_event_id("t" * 249, 7, 2**62)
    assert derived_event_id("t" * 249, 7, 1) != derived_event_id("u" * 249, 7, 1)
    # An id field instead.
    by_field = FOREIGN.model_copy(update={"event_id": "session.n", "event_id_from": "field"})
    with_ids = encode(
        [{**json.loads(v or b""), "session": {"n": f"e{i}"}} for i, v in enumerate(values)]
    )
    assert batch(by_field, with_ids, recs)[0][3][1]["event_id"] == "e3"


def test_message_key_as_user() -> None:
    cfg = FOREIGN.model_copy(update={"user": None, "user_from": "key"})
    rng = random.Random(4)
    values = encode([foreign(i, rng) for i in range(40)])
    keys: list[bytes | None] = [f"key-{i % 5}".encode() for i in range(40)]
    keys[7], keys[9], keys[11] = None, b"\xff\xfe", b"  padded "
    recs = records(40, keys)
    rows, errors, _ = got = batch(cfg, values, recs)
    assert got == reference(cfg, values, recs)
    assert dict(rows)[0]["user_id"] == "key-0" and dict(rows)[11]["user_id"] == "padded"
    assert [(i, r) for i, r, _ in errors] == [(7, "schema"), (9, "schema")]
    assert "user_id" in errors[0][2] and "not UTF-8" in errors[1][2]


def test_mapping_is_validated_at_start_up_with_what_to_fix() -> None:
    base: dict[str, Any] = FOREIGN.model_dump()
    cases: list[tuple[dict[str, Any], str]] = [
        ({"event_types": {"order": "buy"}}, "'order' maps to 'buy', which is not one of ours"),
        ({"event_types": {}}, "map each of your event-type names"),
        ({"item": "product..sku"}, "is not a dotted path"),
        ({"user": None}, "user_from='field' needs `user`"),
        ({"user_from": "key"}, "user_from='key' takes the message key"),
        ({"event_id_from": "field"}, "event_id_from='field' needs `event_id`"),
        ({"event_id": "id"}, "event_id_from='derived'"),
        ({"item_text": "product.sku.name"}, "paths overlap: 'product.sku'"),
        ({"value": "product.sku"}, "read as both item_id and value"),
        ({"ts_format": "epoch_ns"}, "ts_format"),
        ({"colour": "red"}, "colour"),
    ]
    for change, message in cases:
        with pytest.raises(ValidationError, match=re.escape(message)):
            IngestConfig.model_validate({"mapping": {**base, **change}})
    ok = IngestConfig.model_validate({"mapping": {**base, "item_text": "product.sku"}})
    assert ok.mapping is not None and ok.mapping.item_text == "product.sku"


ODD: list[bytes | None] = [
    None, b"", b"5", b"[1]", b"\xff\xfe", b'{"a":1}\n{"b":2}', b"{}",
    b'{"user":{"id":"u"},"product":{"sku":"i"},"action":"order","occurred_at":"2026-01-01T00:00:00Z","x":"\xff"}',
    b'{"user":{"id":"u"},"product":{"sku":"i"},"action":"order","occurred_at":"2026-01-01T00:00:00Z","x":NaN}',
    b'{"user":{"id":5},"product":{"sku":"i"},"action":"order","occurred_at":"2026-01-01T00:00:00Z"}',
    b'{"user":"u","product":{"sku":"i"},"action":"order","occurred_at":"2026-01-01T00:00:00Z"}',
    b'{"user":{"id":"u"},"product":{"sku":"i"},"action":"order","occurred_at":"2026-01-01T00:00:00Z","meta":{"a":NaN}}',
    b'{"user":{"id":"u"},"product":{"sku":"i"},"action":"order","occurred_at":"2026-01-01T00:00:00Z","meta":"x"}',
    b'{"user":{"id":"u"},"product":{"sku":"i"},"action":"order","occurred_at":"1969-12-31T23:59:59Z"}',
    b'{"user":{"id":"u"},"product":{"sku":"i"},"action":"order","occurred_at":"2026-01-01T00:00:00+24:00"}',
    b'{"user":{"id":"u"},"product":{"sku":"i"},"action":"order","occurred_at":"2024-02-29T00:00:00Z"}',
    b'{"user":{"id":"u"},"product":{"sku":"i"},"action":"order","occurred_at":"2023-02-29T00:00:00Z"}',
    b'{"user":{"id":"u"},"product":{"sku":"i"},"action":7,"occurred_at":"2026-01-01T00:00:00Z"}',
    b'{"user":{"id":"u"},"product":{"sku":"i"},"action":null,"occurred_at":"2026-01-01T00:00:00Z"}',
    b'{"user":{"id":"u"},"product":{"sku":"i"},"action":"order","occurred_at":"2026-01-01T00:00:00Z","amount":null}',
    b'{"user":{"id":"u"},"product":{"sku":"i"},"action":"order","occurred_at":"2026-01-01T00:00:00Z","amount":1e7}',
    b'{"user":{"id":"u"},"user":{"id":"v"},"product":{"sku":"i"},"action":"order","occurred_at":"2026-01-01T00:00:00Z"}',
]  # fmt: skip


def test_every_odd_record_is_judged_as_the_record_path_judges_it() -> None:
    good = encode([foreign(i, random.Random(i)) for i in range(3)])
    for odd in ODD:
        values = [*good, odd, *good]
        recs = records(len(values))
        assert batch(FOREIGN, values, recs) == reference(FOREIGN, values, recs), odd
    assert len(reference(FOREIGN, ODD, records(len(ODD)))[1]) > len(ODD) // 2


texts = st.one_of(
    st.text(max_size=5),
    st.sampled_from(["u1", " u1", "u1\u3000", "x" * 128, "x" * 129, ""]),
    st.integers(-3, 3),
    st.none(),
)
stamps = st.one_of(
    st.integers(-(2**60), 2**60),
    st.sampled_from([0, 1_700_000_000, 1_700_000_000_000, 9_007_199_254_740, -1]),
    st.floats(allow_nan=False, allow_infinity=False),
    st.datetimes(timezones=st.sampled_from([UTC, None])).map(lambda d: d.isoformat()),
    st.sampled_from(
        ["2026-01-01T00:00:00Z", "2026-01-01T00:00:00.5-01:30", "2026-02-31T00:00:00Z"]
    ),
    st.none(),
)
foreign_record = st.fixed_dictionaries(
    {},
    optional={
        "user": st.one_of(st.fixed_dictionaries({}, optional={"id": texts}), texts),
        "product": st.fixed_dictionaries({}, optional={"sku": texts, "title": texts}),
        "action": st.one_of(st.sampled_from(["page_view", "order", "view", "other"]), texts),
        "amount": st.one_of(st.floats(), st.integers(-(10**7), 10**7), st.none(), texts),
        "occurred_at": stamps,
        "meta": st.one_of(st.none(), st.just({"a": [1, {"b": None}]}), st.just("x"), st.just({})),
        "extra": st.one_of(st.just(1), st.just({"z": "é"}), st.just([None])),
    },
)
mappings = st.sampled_from(
    [
        FOREIGN,
        FOREIGN.model_copy(update={"ts_format": "epoch_s", "unmapped_types": "drop"}),
        FOREIGN.model_copy(update={"ts_format": "epoch_ms", "context": None}),
        FOREIGN.model_copy(update={"ts_format": "epoch_us", "user": None, "user_from": "key"}),
        FOREIGN.model_copy(update={"event_id": "product.title", "event_id_from": "field"}),
    ]
)


@settings(max_examples=300, deadline=None)
@given(
    mappings,
    st.lists(
        st.tuples(foreign_record, st.booleans(), st.sampled_from([b"k", None, b"\xff", b" u "]))
    ),
)
def test_any_records_are_judged_as_the_record_path_judges_them(
    cfg: MappingConfig, recs_: list[tuple[dict[str, Any], bool, bytes | None]]
) -> None:
    good = encode([foreign(i, random.Random(i)) for i in range(2)])
    values = good + [json.dumps(r, ensure_ascii=a).encode() for r, a, _ in recs_]
    keys: list[bytes | None] = [b"k", b"k"]
    recs = records(len(values), keys + [k for *_, k in recs_])
    assert batch(cfg, values, recs) == reference(cfg, values, recs)


# -- through a real broker -------------------------------------------------------------------


def _shop_events(n: int, seed: int) -> list[tuple[bytes, dict[str, Any]]]:
    """(key, record) in a shop's own shape: nested, ISO timestamps in several zones, its own event
    types (1 in 40 of a type the mapping does not know), no event ids."""
    rng = random.Random(seed)
    out = []
    base = datetime(2026, 3, 1, tzinfo=UTC).timestamp()
    zones = [("Z", 0), ("+01:00", 3600), ("-05:30", -19800)]
    for i in range(n):
        user = f"cust-{rng.randrange(400)}"
        zone, shift = zones[i % 3]
        local = datetime.fromtimestamp(base + i * 0.5 + shift, UTC).replace(tzinfo=None)
        rec = {
            "customer": {"uid": user, "segment": rng.choice(["new", "loyal"])},
            "product": {"sku": f"sku-{rng.randrange(900)}", "title": f"item {i % 900}"},
            "action": "wishlist"
            if i % 40 == 39
            else rng.choice(["page_view", "add_to_cart", "order"]),
            "occurred_at": local.isoformat(timespec="milliseconds") + zone,
            "meta": {"device": rng.choice(["ios", "web"])},
        }
        out.append((user.encode(), rec))
    return out


SHOP = MappingConfig(
    user="customer.uid",
    item="product.sku",
    item_text="product.title",
    event_type="action",
    event_types={"page_view": "view", "add_to_cart": "cart", "order": "purchase"},
    ts="occurred_at",
    ts_format="iso8601",
)


@pytest.mark.integration
@pytest.mark.slow
def test_foreign_topic_through_a_mapping_survives_kill_9_exactly_once(
    kafka: KafkaConfig, topics: TopicsConfig, tmp_path: Path
) -> None:
    ensure_topics(kafka, topics)
    shop = _shop_events(24_000, seed=9)

    def produce() -> None:
        prod = make_producer(kafka)
        start = time.monotonic()
        for i, (key, rec) in enumerate(shop):
            ahead = i / 2_000.0 - (time.monotonic() - start)
            if ahead > 0:
                time.sleep(ahead)
            prod.send(topics.events, key=key, value=json.dumps(rec).encode())
        prod.flush(timeout=120)
        prod.close(timeout=30)

    producer = threading.Thread(target=produce)
    producer.start()
    buf_cfg = BufferConfig(path=tmp_path / "buf")
    env = {
        "STREAMTUNE_INGEST__MAPPING": SHOP.model_dump_json(),
        "STREAMTUNE_INGEST__INSTANCE_ID": "ingest-0",
        "STREAMTUNE_INGEST__MAX_POLL_RECORDS": "300",
    }
    rng = random.Random(99)
    kills, rows_seen = 0, [0]
    while producer.is_alive() or kills < 8:
        proc = _ingest_subprocess(kafka, topics, buf_cfg, tmp_path, **env)
        deadline = time.monotonic() + 8.0
        while EventBuffer(buf_cfg).stats().rows == rows_seen[-1] and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 1.0))
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        kills += 1
        rows_seen.append(EventBuffer(buf_cfg).stats().rows)
    producer.join()
    assert len(set(rows_seen)) >= 5, rows_seen  # most kills landed while data flowed
    buf = EventBuffer(buf_cfg)
    assert len({seg.writer for seg in buf.segments()}) >= 5  # killed processes had written
    ingest_once(kafka, topics, buf, mapping=SHOP)

    table = buf.read()
    # Exactly once by position: every offset of every partition is in the buffer once, or was
    # dead-lettered (the unmapped type); the derived ids are '<topic>:<partition>:<offset>'.
    ids = table["event_id"].to_pylist()
    assert len(ids) == len(set(ids)), f"{len(ids) - len(set(ids))} duplicated"
    ends = end_offsets(kafka, topics.events)
    assert sum(ends.values()) == len(shop)
    assert sum(buf.watermark().values()) == len(shop), _logs(tmp_path)
    expected = {f"{topics.events}:{p}:{o}" for p, end in ends.items() for o in range(end)}
    unmapped = sum(1 for _, r in shop if r["action"] == "wishlist")
    assert len(ids) == len(shop) - unmapped and set(ids) <= expected
    # The rows are the shop's events, mapped: same users, items, types and instants.
    ours = {"page_view": "view", "add_to_cart": "cart", "order": "purchase"}
    want = sorted(
        (
            r["customer"]["uid"], r["product"]["sku"], ours[r["action"]],
            int(datetime.fromisoformat(r["occurred_at"]).timestamp() * 1000),
        )
        for _, r in shop
        if r["action"] != "wishlist"
    )  # fmt: skip
    got = sorted(
        zip(
            *(table[c].to_pylist() for c in ("user_id", "item_id", "event_type", "ts")), strict=True
        )
    )
    assert got == want
    # The unmapped ones are in the dead-letter topic with the reason (at least once each).
    consumer = KafkaConsumer(
        topics.dead_letter,
        bootstrap_servers=kafka.bootstrap_servers,
        auto_offset_reset="earliest",
        consumer_timeout_ms=5000,
        group_id=f"check-{uuid.uuid4().hex}",
    )
    dead = set()
    for m in consumer:
        h = {k: v.decode() for k, v in m.headers}
        assert h["reason"] == UNMAPPED and "wishlist" in h["detail"]
        dead.add((int(h["source_partition"]), int(h["source_offset"])))
    consumer.close()
    assert len(dead) == unmapped
    assert {f"{topics.events}:{p}:{o}" for p, o in dead}.isdisjoint(ids)
