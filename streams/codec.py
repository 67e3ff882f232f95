"""Batch decoding: a poll's record values straight into Arrow columns, by the rules of ``decode``.

``events.decode`` (pydantic, one record at a time) is the contract. This is its fast path: the
poll's values are joined into one newline-delimited block that pyarrow's JSON reader parses in
C++ against a fixed schema (``streams.jsonblock``), and the schema's rules are then checked
column-wise (``streams.columns``). A row is taken here only when it is in the contract's plain
form - every field of the right JSON type, ids and texts without surrounding whitespace, no
``context`` object, ``v`` and ``value`` present - and ``decode`` would accept it with exactly
these values. Every other record (and the whole block, when the reader refuses it) goes through
``decode`` itself, so what is accepted, what is dead-lettered and why is the same as record by
record; the fast path only decides faster.

Mapped records (``streams.mapping``) take the same road through ``streams.codec_mapped``.
"""

from __future__ import annotations

from collections.abc import Sequence

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pj

from streams.codec_mapped import decode_mapped
from streams.columns import (
    DECODED,
    EVENT_COLUMNS,
    SPACE,
    Decoded,
    Record,
    valid_rows,
)
from streams.events import DecodeError, decode
from streams.jsonblock import parse
from streams.mapping import MappingConfig

__all__ = ["EVENT_COLUMNS", "SPACE", "Decoded", "Record", "decode_batch", "valid_rows"]

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
_PARSE = pj.ParseOptions(explicit_schema=_WIRE, unexpected_field_behavior="error")


def decode_batch(
    values: Sequence[bytes | None],
    mapping: MappingConfig | None = None,
    records: Sequence[Record] | None = None,
) -> Decoded:
    """Decode ``values`` by ``events.decode``'s rules; the common case without a Python object
    per record. With a ``mapping``, by ``mapping.map_record``'s rules, and ``records`` (one per
    value, all of one partition) says where each value came from: its key and offset."""
    if mapping is not None:
        return decode_mapped(values, mapping, records or [])
    chunks = []
    for table, index in parse(values, range(len(values)), _PARSE):
        rows = table.select(EVENT_COLUMNS).append_column("index", pa.array(index, pa.int64()))
        chunks.append(rows.filter(_plain_rows(table)).cast(DECODED))
    fast = pa.concat_tables(chunks) if chunks else DECODED.empty_table()
    if fast.num_rows == len(values):
        return Decoded(fast, [])
    taken = set(fast["index"].to_pylist())
    rest = _one_by_one(values, [i for i in range(len(values)) if i not in taken])
    merged = pa.concat_tables([fast, rest.table]).sort_by("index")
    return Decoded(merged, rest.errors, rest.one_by_one)


def _plain_rows(t: pa.Table) -> pa.ChunkedArray:
    """True where the row is a valid event in plain form (see the module docstring)."""
    # Null is not absent for decode() (a null ``value`` is refused, an absent one is 1.0): the
    # reader cannot tell them apart, so rows missing these are decode()'s. A context object is
    # refused by the reader; a context string, or null, is decode()'s too.
    ok = pc.and_(pc.and_(pc.equal(t["v"], 1), pc.is_null(t["context"])), valid_rows(t))
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
    table = pa.Table.from_pydict({**cols, "index": taken}, schema=DECODED)
    return Decoded(table, errors, len(indices))
