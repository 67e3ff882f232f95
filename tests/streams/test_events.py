"""The event contract: what decodes, what is rejected and why."""

from __future__ import annotations

import json

import pytest

from streams.events import ARROW_SCHEMA, DecodeError, Event, EventType, RowBatch, decode


def good(**kw: object) -> dict[str, object]:
    base: dict[str, object] = {
        "event_id": "e1",
        "user_id": "u1",
        "item_id": "i1",
        "event_type": "click",
        "ts": 1_700_000_000_000,
    }
    base.update(kw)
    return base


def test_round_trip_and_key() -> None:
    e = Event(**good(item_text="Toy Story (1995)", context={"page": "home"}))  # type: ignore[arg-type]
    back = decode(e.encode())
    assert back == e
    assert back.key() == b"u1"
    assert back.event_type is EventType.CLICK and back.v == 1


def test_integer_ids_become_strings() -> None:
    e = decode(json.dumps(good(user_id=196, item_id=242)).encode())
    assert (e.user_id, e.item_id) == ("196", "242")


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"\xff\xfe\x00garbage", "undecodable"),
        (b"{not json", "undecodable"),
        (None, "empty"),
        (json.dumps(good(event_type="like")).encode(), "schema"),
        (json.dumps(good(ts=-5)).encode(), "schema"),
        (json.dumps(good(extra_field=1)).encode(), "schema"),
        (json.dumps(good(v=2)).encode(), "schema"),
        (json.dumps({k: v for k, v in good().items() if k != "item_id"}).encode(), "schema"),
        (json.dumps(good(value="NaN")).encode(), "schema"),
        (b"[1, 2, 3]", "schema"),
    ],
)
def test_rejects_with_reason(raw: bytes | None, reason: str) -> None:
    with pytest.raises(DecodeError) as info:
        decode(raw)
    assert info.value.reason == reason
    assert info.value.detail


def test_row_batch_matches_arrow_schema() -> None:
    rows = RowBatch()
    rows.append(Event(**good(context={"a": 1})), "t", 3, 42)  # type: ignore[arg-type]
    table = rows.to_table()
    assert table.schema.equals(ARROW_SCHEMA)
    assert table.to_pylist()[0]["context"] == '{"a": 1}'
    assert table.to_pylist()[0]["offset"] == 42
