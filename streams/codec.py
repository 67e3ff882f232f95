"""Batch decoding: a poll's record values straight into Arrow columns, by the rules of ``decode``.

``events.decode`` (pydantic, one record at a time) is the contract. This is its fast path: the
poll's values are joined into one newline-delimited block that pyarrow's JSON reader parses in
C++ against a fixed schema, and the schema's rules are then checked column-wise. A row is taken
here only when it is in the contract's plain form - every field of the right JSON type, ids and
texts without surrounding whitespace, no ``context`` object, ``v`` and ``value`` present - and
``decode`` would accept it with exactly these values. Every other record (and the whole block,
when the reader refuses it) goes through ``decode`` itself, so what is accepted, what is
dead-lettered and why is the same as record by record; the fast path only decides faster.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pj

from streams.events import ARROW_SCHEMA, DecodeError, Event, EventType, decode

# The columns a record carries, as JSON types the reader must find (anything else: refused).
_WIRE = pa.schema(
    [
        pa.field("v", pa.int64()),
        pa.field("event_id", pa.string()),
        pa.field("user_id", pa.string()),
        pa.field("item_id", pa.string()),
        pa.field("event_type", pa.string()),
        pa.field("value", pa.float64()),
        pa.field("ts", pa.int64()),
        pa.field("item_text", pa.string()),
        pa.field("context", pa.string()),  # an object is refused: such records take decode()
    ]
)
EVENT_COLUMNS = [n for n in ARROW_SCHEMA.names if n not in ("topic", "partition", "offset")]
_DECODED = pa.schema([ARROW_SCHEMA.field(n) for n in EVENT_COLUMNS] + [("index", pa.int64())])
_PARSE = pj.ParseOptions(explicit_schema=_WIRE, unexpected_field_behavior="error")
_TYPES = pa.array([t.value for t in EventType])


def _limits(name: str) -> tuple[int, int]:
    lo, hi = 0, sys.maxsize
    for m in Event.model_fields[name].metadata:
        lo = getattr(m, "min_length", None) or lo
        hi = getattr(m, "max_length", None) or hi
    return lo, hi


def _bounds(name: str) -> tuple[float, float, bool]:
    """(lowest, highest, highest included) of a numeric field, from the model's constraints."""
    lo, hi, closed = -float("inf"), float("inf"), True
    for m in Event.model_fields[name].metadata:
        if getattr(m, "ge", None) is not None:
            lo = float(m.ge)
        if getattr(m, "le", None) is not None:
            hi, closed = float(m.le), True
        if getattr(m, "lt", None) is not None:
            hi, closed = float(m.lt), False
    return lo, hi, closed


# What str.strip() removes (the model strips every text field): such a row's stored value would
# differ from the wire's, so it is decode()'s to judge. The code points of str.isspace() (a test
# checks this list against Python's own).
SPACE = [
    *range(0x09, 0x0E), *range(0x1C, 0x21), 0x85, 0xA0, 0x1680, *range(0x2000, 0x200B),
    0x2028, 0x2029, 0x202F, 0x205F, 0x3000,
]  # fmt: skip
_SPACE = "".join(chr(c) for c in SPACE)
_TEXTS = {name: _limits(name) for name in ("event_id", "user_id", "item_id", "item_text")}
_VALUE = _bounds("value")
_TS = _bounds("ts")


@dataclass(frozen=True)
class Decoded:
    """A poll's values, decoded: the accepted rows (event columns plus ``index``, the position
    of each row's record in the input, ascending) and the refused records with the reason."""

    table: pa.Table
    errors: list[tuple[int, DecodeError]]
    one_by_one: int = 0  # records that went through decode() (not in plain form, or refused)


def decode_batch(values: Sequence[bytes | None]) -> Decoded:
    """Decode ``values`` by ``events.decode``'s rules; the common case without a Python object
    per record."""
    chunks = []
    for table, index in _parse(values, range(len(values))):
        rows = table.select(EVENT_COLUMNS).append_column("index", pa.array(index, pa.int64()))
        chunks.append(rows.filter(_plain_rows(table)).cast(_DECODED))
    fast = pa.concat_tables(chunks) if chunks else _DECODED.empty_table()
    if fast.num_rows == len(values):
        return Decoded(fast, [])
    taken = set(fast["index"].to_pylist())
    rest = _one_by_one(values, [i for i in range(len(values)) if i not in taken])
    merged = pa.concat_tables([fast, rest.table]).sort_by("index")
    return Decoded(merged, rest.errors, rest.one_by_one)


def _parse(
    values: Sequence[bytes | None], index: Sequence[int]
) -> list[tuple[pa.Table, np.ndarray]]:
    """The records at ``index`` through pyarrow's reader, as (table, index) parts in order.

    A part the reader refuses is halved until the refused records are isolated (those are
    left out, for decode()), so one bad record costs a few small parses, not the whole poll.
    """
    lines: Sequence[bytes | None] = (
        values if len(index) == len(values) else [values[i] for i in index]
    )
    block = b"\n".join(lines) if None not in lines else None  # type: ignore[arg-type]
    if block is None or block.count(b"\n") != len(lines) - 1 or b"\r" in block:
        # The reader needs one record per line: drop those it cannot take as one, once.
        index = [
            i
            for i in index
            if (v := values[i]) is not None and v[:1] == b"{" and b"\n" not in v and b"\r" not in v
        ]
        lines = [values[i] for i in index]
        block = b"\n".join(lines)  # type: ignore[arg-type]
    if not index:
        return []
    table = _read(block, lines)  # type: ignore[arg-type]
    if table is not None:
        return [(table, np.asarray(index, dtype=np.int64))]
    if len(index) <= _SMALLEST_PART:
        return []
    half = len(index) // 2
    return _parse(values, index[:half]) + _parse(values, index[half:])


_SMALLEST_PART = 16  # below this, refused parts go to decode() whole


def _read(block: bytes, lines: list[bytes]) -> pa.Table | None:
    """``lines`` (joined: ``block``) through pyarrow's reader; None when it refuses any line."""
    # Two blocks or more, parsed on Arrow's threads; a block must hold the longest line whole.
    size = max(len(block) // 2 + 1, max(map(len, lines)) + 1, 1 << 16)
    try:
        table = pj.read_json(
            pa.BufferReader(block),
            read_options=pj.ReadOptions(use_threads=True, block_size=size),
            parse_options=_PARSE,
        )
        table.validate(full=True)  # the reader does not check that strings are UTF-8
    except (pa.ArrowException, UnicodeError, ValueError):
        return None
    # An empty or blank line gives no row: only as many rows as lines keeps rows and records
    # aligned (one line, one object; anything else is decode()'s).
    if table.num_rows != len(lines):
        return None
    return table


def _plain_rows(t: pa.Table) -> pa.ChunkedArray:
    """True where the row is a valid event in plain form (see the module docstring)."""
    ok = pc.and_(pc.equal(t["v"], 1), pc.is_in(t["event_type"], value_set=_TYPES))
    for name, (shortest, longest) in _TEXTS.items():
        col = t[name]
        n = pc.utf8_length(col)
        good = pc.and_(
            pc.and_(pc.greater_equal(n, shortest), pc.less_equal(n, longest)),
            pc.equal(pc.utf8_trim(col, characters=_SPACE), col),
        )
        if name == "item_text":  # optional: absent or null both mean None
            good = pc.or_(pc.is_null(col), good)
        ok = pc.and_(ok, good)
    value = t["value"]
    lo, hi, _ = _VALUE
    ok = pc.and_(ok, pc.and_(pc.is_finite(value), pc.greater_equal(value, lo)))
    ok = pc.and_(ok, pc.less_equal(value, hi))
    ts = t["ts"]
    first, end, closed = _TS
    ok = pc.and_(ok, pc.greater_equal(ts, int(first)))
    ok = pc.and_(ok, pc.less_equal(ts, int(end)) if closed else pc.less(ts, int(end)))
    # Null is not absent for decode() (a null ``value`` is refused, an absent one is 1.0): the
    # reader cannot tell them apart, so rows missing these are decode()'s. A context object is
    # refused by the reader; a context string, or null, is decode()'s too.
    ok = pc.and_(ok, pc.is_null(t["context"]))
    return pc.fill_null(ok, False)


def _one_by_one(values: Sequence[bytes | None], indices: Sequence[int]) -> Decoded:
    cols: dict[str, list[object]] = {n: [] for n in EVENT_COLUMNS}
    taken: list[int] = []
    errors: list[tuple[int, DecodeError]] = []
    for i in indices:
        try:
            e = decode(values[i])
        except DecodeError as err:
            errors.append((i, err))
            continue
        for name, val in e.columns().items():
            cols[name].append(val)
        taken.append(i)
    table = pa.Table.from_pydict({**cols, "index": taken}, schema=_DECODED)
    return Decoded(table, errors, len(indices))
