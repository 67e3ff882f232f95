"""Events as Arrow columns: what a batch decode returns, and the contract's rules column-wise.

``events.decode`` (pydantic, one record at a time) is the contract. The batch paths
(``streams.codec`` for native records, ``streams.codec_mapped`` for mapped ones) take a row only
where ``valid_rows`` says ``decode`` would accept it with exactly these values; the limits come
from the model's own field constraints, so the two cannot drift apart.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Protocol

import pyarrow as pa
import pyarrow.compute as pc

from streams.events import ARROW_SCHEMA, DecodeError, Event, EventType

EVENT_COLUMNS = [n for n in ARROW_SCHEMA.names if n not in ("topic", "partition", "offset")]
DECODED = pa.schema([ARROW_SCHEMA.field(n) for n in EVENT_COLUMNS] + [("index", pa.int64())])


@dataclass(frozen=True)
class Decoded:
    """A poll's values, decoded: the accepted rows (event columns plus ``index``, the position
    of each row's record in the input, ascending) and the refused records with the reason."""

    table: pa.Table
    errors: list[tuple[int, DecodeError]]
    one_by_one: int = 0  # records that went through decode() (not in plain form, or refused)
    dropped: list[int] = field(default_factory=list)  # mapped: unmapped types, dropped by choice


class Record(Protocol):
    """Where a value came from (kafka-python's ConsumerRecord has these)."""

    @property
    def topic(self) -> str: ...
    @property
    def partition(self) -> int: ...
    @property
    def offset(self) -> int: ...
    @property
    def key(self) -> bytes | None: ...


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
_TYPES = pa.array([t.value for t in EventType])


def valid_rows(t: pa.Table) -> pa.ChunkedArray:
    """The contract's rules, column-wise, over event columns (``v`` and ``context`` apart): true
    where ``decode`` would accept the row with exactly these values, null or false elsewhere.
    Shared by the native and the mapped batch paths."""
    ok = pc.is_in(t["event_type"], value_set=_TYPES)
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
    return pc.and_(ok, pc.less_equal(ts, int(end)) if closed else pc.less(ts, int(end)))
