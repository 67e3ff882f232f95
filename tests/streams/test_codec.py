"""The batch decoder decides exactly as ``events.decode`` does, record by record."""

from __future__ import annotations

import json
import random
import sys
from typing import Any

import pyarrow as pa
from hypothesis import given, settings
from hypothesis import strategies as st

from streams.codec import EVENT_COLUMNS, SPACE, decode_batch
from streams.datasets import DriftSpec, synthetic_drift
from streams.events import DecodeError, decode


def reference(values: list[bytes | None]) -> tuple[list[tuple[int, dict[str, Any]]], list[Any]]:
    """What decode() makes of each record: accepted rows (position, columns) and refusals."""
    rows, errors = [], []
    for i, v in enumerate(values):
        try:
            rows.append((i, decode(v).columns()))
        except DecodeError as err:
            errors.append((i, err.reason, err.detail))
    return rows, errors


def batch(values: list[bytes | None]) -> tuple[list[tuple[int, dict[str, Any]]], list[Any]]:
    d = decode_batch(values)
    rows = [(r["index"], {k: r[k] for k in EVENT_COLUMNS}) for r in d.table.to_pylist()]
    return rows, [(i, e.reason, e.detail) for i, e in d.errors]


def plain_events(n: int) -> list[bytes]:
    return [e.encode() for e in synthetic_drift(DriftSpec(users=50, events=n, seed=3))]


BASE = b'"v":1,"event_id":"e","user_id":"u","item_id":"i","event_type":"view"'
ODD: list[bytes | None] = [
    None, b"", b" ", b"{}", b"5", b"[1]", b"\xff\xfe", b'{"a":1}\n{"b":2}', b'{"a":1}\r',
    b'{"v":1,"event_id":" e","user_id":"u","item_id":"i","event_type":"view","value":1,"ts":5}',
    b'{"v":1,"event_id":"e","user_id":5,"item_id":"i","event_type":"view","value":1,"ts":5}',
    b'{"v":1,"event_id":"e","user_id":"u","item_id":"i","event_type":"view","ts":5}',
    b'{"event_id":"e","user_id":"u","item_id":"i","event_type":"view","value":2,"ts":5}',
    b"{" + BASE + b',"value":null,"ts":5}',
    b'{"v":1,"event_id":"e","user_id":"u","item_id":"i","event_type":"View","value":1,"ts":5}',
    b"{" + BASE + b',"value":1,"ts":5.0}',
    b"{" + BASE + b',"value":1,"ts":"5"}',
    b"{" + BASE + b',"value":1e7,"ts":5}',
    b"{" + BASE + b',"value":NaN,"ts":5}',
    b"{" + BASE + b',"value":1,"ts":9007199254740992}',
    b"{" + BASE + b',"value":1,"ts":9007199254740991}',
    b"{" + BASE + b',"value":1,"ts":-1}',
    b"{" + BASE + b',"value":1,"ts":5,"context":{"a":[1,2]}}',
    b"{" + BASE + b',"value":1,"ts":5,"context":"x"}',
    b"{" + BASE + b',"value":1,"ts":5,"item_text":"\\u00a0t"}',
    b"{" + BASE + b',"value":1,"ts":5,"item_text":"t\\u2028"}',
    b"{" + BASE + b',"value":1,"ts":5,"item_text":null}',
    b"{" + BASE + b',"value":1,"ts":5,"extra":1}',
    b'{"v":1,"event_id":"' + b"x" * 129 + b'","user_id":"u","item_id":"i","event_type":"view",'
    b'"value":1,"ts":5}',
    b'{"v":1,"event_id":"\xc3\xa9' + b"x" * 127 + b'","user_id":"u","item_id":"i",'
    b'"event_type":"view","value":1,"ts":5}',
    b'{"v":2,"event_id":"e","user_id":"u","item_id":"i","event_type":"view","value":1,"ts":5}',
    b'{"v":1,"event_id":"e","event_id":"f","user_id":"u","item_id":"i","event_type":"view",'
    b'"value":1,"ts":5}',
    b'{"v":1,"event_id":"\\ud83d\\ude00","user_id":"u","item_id":"i","event_type":"view",'
    b'"value":1,"ts":5}',
    b'{"v":1,"event_id":"\\ud800","user_id":"u","item_id":"i","event_type":"view","value":1,"ts":5}',
]  # fmt: skip


def test_space_list_is_what_str_strip_removes() -> None:
    assert [c for c in range(sys.maxunicode + 1) if chr(c).isspace()] == SPACE


def test_plain_events_take_the_fast_path_with_the_same_rows() -> None:
    values: list[bytes | None] = list(plain_events(2000))
    d = decode_batch(values)
    assert d.one_by_one == 0 and not d.errors and d.table.num_rows == 2000
    assert batch(values) == reference(values)


def test_one_bad_record_does_not_send_the_poll_one_by_one() -> None:
    values: list[bytes | None] = list(plain_events(2000))
    values[1234] = b"{" + BASE + b',"value":1,"ts":5,"extra":1}'  # the reader refuses its block
    values[77] = None  # a tombstone
    d = decode_batch(values)
    assert [i for i, _ in d.errors] == [77, 1234]
    assert 2 <= d.one_by_one <= 17  # the refused record's part of at most 16, and the tombstone
    assert batch(values) == reference(values)


def test_every_odd_record_is_judged_as_decode_judges_it() -> None:
    good: list[bytes | None] = list(plain_events(3))
    for odd in ODD:
        values = [*good, odd, *good]
        assert batch(values) == reference(values), odd
    # the refusals really happened: not every odd record is a valid event
    assert len(reference(ODD)[1]) > len(ODD) // 2


def test_mixed_polls_keep_positions_and_order() -> None:
    rng = random.Random(0)
    pool = plain_events(300)
    for _ in range(100):
        values: list[bytes | None] = [*rng.sample(pool, 25), *rng.sample(ODD, 5)]
        rng.shuffle(values)
        got = batch(values)
        assert got == reference(values)
        assert [i for i, _ in got[0]] == sorted(i for i, _ in got[0])


def test_empty_poll() -> None:
    d = decode_batch([])
    assert d.table.num_rows == 0 and not d.errors
    assert isinstance(d.table, pa.Table)


texts = st.one_of(
    st.text(max_size=6),
    st.text(
        alphabet=st.sampled_from([" ", "\t", "\u00a0", "\u3000", "a", "é", "\x00"]), max_size=4
    ),
    st.text(min_size=126, max_size=131, alphabet="xé"),
    st.integers(-3, 3),
    st.none(),
)
numbers = st.one_of(
    st.integers(-(2**60), 2**60),
    st.sampled_from([0, 1, 2**53 - 1, 2**53, -1, 10**6, 10**6 + 1, -(10**6)]),
    st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from([1.0, 5.0, 0.5, -0.0]),
    st.text(max_size=3),
    st.none(),
)
record = st.fixed_dictionaries(
    {},
    optional={
        "v": st.one_of(st.just(1), numbers),
        "event_id": texts,
        "user_id": texts,
        "item_id": texts,
        "event_type": st.one_of(
            st.sampled_from(["view", "click", "rating", " view", "VIEW"]), texts
        ),
        "value": numbers,
        "ts": numbers,
        "item_text": texts,
        "context": st.one_of(st.none(), st.just({"a": 1}), st.just("x")),
        "other": st.just(1),
    },
)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(record, st.booleans()), max_size=8))
def test_any_records_are_judged_as_decode_judges_them(
    recs: list[tuple[dict[str, Any], bool]],
) -> None:
    good: list[bytes | None] = list(plain_events(2))
    values = [*good] + [json.dumps(r, ensure_ascii=ascii).encode() for r, ascii in recs]
    assert batch(values) == reference(values)


def test_native_records_ignore_where_they_came_from() -> None:
    # decode_batch's mapping arguments leave the native path as it was.
    values: list[bytes | None] = [*plain_events(50), *ODD]
    d = decode_batch(values, None, [])
    assert d.table.equals(decode_batch(values).table) and d.one_by_one > 0
    assert [(i, e.reason, e.detail) for i, e in d.errors] == reference(values)[1]
