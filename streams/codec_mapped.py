"""Batch decoding of mapped records (``streams.mapping``): foreign JSON into the native columns.

The same road as ``streams.codec``'s native path: pyarrow's reader parses the nested fields the
mapping names (ignoring the others), event types, timestamps, keys and derived ids are converted
column-wise into the native columns, and the same contract checks (``columns.valid_rows``) decide
which rows are taken; every other record goes through ``mapping.map_record``, which ends in
``decode``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pj

from streams.columns import DECODED, EVENT_COLUMNS, Decoded, Record, valid_rows
from streams.events import DecodeError
from streams.jsonblock import parse
from streams.mapping import (
    UNMAPPED,
    MappingConfig,
    derived_id_prefix,
    lookup,
    map_record,
    unmapped_detail,
)

_ISO = (
    r"^\d{4}-\d{2}-\d{2}T(?:[01]\d|2[0-3]):[0-5]\d:[0-5]\d(?:\.\d{1,9})?"
    r"(?:Z|[+-](?:[01]\d|2[0-3]):[0-5]\d)$"
)
_BASE = "%Y-%m-%dT%H:%M:%S"


@dataclass(frozen=True)
class _Plan:
    """What the batch path needs of a mapping, built once per mapping (not once per poll)."""

    options: pj.ParseOptions
    theirs: pa.Array  # the mapping's event-type names
    ours: pa.Array  # their native names, position by position


_plans: dict[str, _Plan] = {}


def _plan(cfg: MappingConfig) -> _Plan:
    key = cfg.model_dump_json()  # the config holds a dict, so it does not hash itself
    plan = _plans.get(key)
    if plan is None:  # fields the mapping does not name are ignored, whatever they hold
        plan = _Plan(
            options=pj.ParseOptions(
                explicit_schema=cfg.wire_schema(), unexpected_field_behavior="ignore"
            ),
            theirs=pa.array(list(cfg.event_types), pa.string()),
            ours=pa.array(list(cfg.event_types.values()), pa.string()),
        )
        _plans[key] = plan
    return plan


def decode_mapped(
    values: Sequence[bytes | None], cfg: MappingConfig, records: Sequence[Record]
) -> Decoded:
    if (cfg.user_from == "key" or cfg.event_id_from == "derived") and len(records) != len(values):
        raise ValueError(
            f"this mapping needs the {len(values)} values' records, got {len(records)}"
        )
    first = records[0] if records else None
    origin = (first.topic, first.partition) if first is not None else ("", 0)
    plan = _plan(cfg)
    chunks: list[pa.Table] = []
    decided: list[pa.Array] = []  # positions taken here (fast rows, unmapped types)
    errors: list[tuple[int, DecodeError]] = []
    dropped: list[int] = []
    for table, index in parse(values, range(len(values)), plan.options, utf8=True):
        rows, mask, unmapped = _mapped_columns(table, index, cfg, plan, values, records, origin)
        fast = rows.filter(mask).cast(DECODED)
        if fast.num_rows == len(values):  # the common poll: every record taken here
            return Decoded(fast, [])
        chunks.append(fast)
        decided.append(fast["index"].combine_chunks())
        decided.append(pa.array([i for i, _ in unmapped], pa.int64()))
        for i, kind in unmapped:
            if cfg.unmapped_types == "drop":
                dropped.append(i)
            else:
                errors.append((i, DecodeError(UNMAPPED, unmapped_detail(kind))))
    left = np.ones(len(values), dtype=bool)
    for taken in decided:
        left[taken.to_numpy()] = False
    rest = np.flatnonzero(left).tolist()
    slow = _one_by_one_mapped(values, rest, cfg, records, origin)
    merged = pa.concat_tables([*chunks, slow.table]) if rest or len(chunks) != 1 else chunks[0]
    if rest or len(chunks) > 1:
        merged = merged.sort_by("index")
    return Decoded(
        merged, sorted(errors + slow.errors, key=lambda e: e[0]), slow.one_by_one,
        sorted(dropped + slow.dropped),
    )  # fmt: skip


def _field(table: pa.Table, path: str) -> pa.ChunkedArray:
    head, *rest = path.split(".")
    col = table.column(head)
    for name in rest:  # a null parent gives a null child
        col = pc.struct_field(col, name)
    return col


def _mapped_columns(
    table: pa.Table, index: np.ndarray, cfg: MappingConfig, plan: _Plan,
    values: Sequence[bytes | None], records: Sequence[Record], origin: tuple[str, int],
) -> tuple[pa.Table, pa.ChunkedArray, list[tuple[int, str]]]:  # fmt: skip
    """A parsed part in the native event columns (plus ``index``), the rows the contract takes
    as they are, and the (position, name) of rows whose event type the mapping does not know."""
    n = table.num_rows
    kinds = _field(table, cfg.event_type)
    at = pc.index_in(kinds, value_set=plan.theirs)
    event_type = pc.take(plan.ours, at)
    unmapped: list[tuple[int, str]] = []
    if at.null_count:  # some type is absent or not the mapping's
        unknown = pc.and_(pc.is_valid(kinds), pc.is_null(at))
        unmapped = list(
            zip(
                pa.array(index).filter(pc.fill_null(unknown, False).combine_chunks()).to_pylist(),
                kinds.filter(unknown).to_pylist(),
                strict=True,
            )
        )
    if cfg.event_id_from == "derived":
        event_id = pc.binary_join_element_wise(
            derived_id_prefix(*origin), pc.cast(_offsets(records, index), pa.string()), ""
        )
    else:
        event_id = _field(table, cfg.event_id)  # type: ignore[arg-type]
    user = _key_users([records[i].key for i in index]) if cfg.user_from == "key" else None
    ok = None  # where a row's context can be stored as it is (no context: everywhere)
    context = pa.nulls(n, pa.string())
    if cfg.context is not None:
        context, ok = _contexts(_field(table, cfg.context), index, values, cfg.context)
    native = pa.table(
        {
            "event_id": event_id,
            "user_id": user if user is not None else _field(table, cfg.user),  # type: ignore[arg-type]
            "item_id": _field(table, cfg.item),
            "event_type": event_type,
            "value": (
                pc.fill_null(_field(table, cfg.value), 1.0)
                if cfg.value is not None
                else pa.array(np.ones(n))
            ),
            "ts": _epoch_ms(_field(table, cfg.ts), cfg.ts_format),
            "item_text": (
                _field(table, cfg.item_text)
                if cfg.item_text is not None
                else pa.nulls(n, pa.string())
            ),
            "context": context,
            "index": pa.array(index, pa.int64()),
        }
    )
    valid = valid_rows(native)
    return native, pc.fill_null(valid if ok is None else pc.and_(ok, valid), False), unmapped


def _offsets(records: Sequence[Record], index: np.ndarray) -> pa.Array:
    """The offsets of ``records[index]``. A partition's offsets only grow, so when the poll's
    last is as far from its first as its length allows they are consecutive, and arithmetic
    gives them without reading each record (a gap, from compaction or transaction markers,
    reads them one by one)."""
    first, last = records[0].offset, records[-1].offset
    if last - first == len(records) - 1:
        return pa.array(index + first, pa.int64())
    return pa.array([records[i].offset for i in index], pa.int64())


def _key_users(keys: list[bytes | None]) -> pa.Array:
    """Message keys as user ids; null where a key is absent or not UTF-8 (map_record says why)."""
    raw = pa.array(keys, pa.binary())
    try:
        users = raw.view(pa.string())
        users.validate(full=True)
        return users
    except pa.ArrowInvalid:
        return pa.array([k.decode() if k is not None and _utf8(k) else None for k in keys])


def _utf8(b: bytes) -> bool:
    try:
        b.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _contexts(
    col: pa.ChunkedArray, index: np.ndarray, values: Sequence[bytes | None], path: str
) -> tuple[pa.Array, pa.Array]:
    """Context objects as the buffer stores them (JSON text), and false where a row's cannot be
    stored as it is. The reader checks only that each is an object; its members are read here, by
    the json module (a row per record with a context: mapped contexts cost that)."""
    present = pc.is_valid(col).to_numpy(zero_copy_only=False)
    texts: list[str | None] = [None] * len(index)
    ok = np.ones(len(index), dtype=bool)
    for row in np.flatnonzero(present):
        raw = values[index[row]]
        assert raw is not None  # the reader parsed it
        try:
            texts[row] = json.dumps(lookup(json.loads(raw, strict=False), path), allow_nan=False)
        except ValueError:  # NaN/Infinity inside: map_record decides
            ok[row] = False
    return pa.array(texts, pa.string()), pa.array(ok)


def _epoch_ms(raw: pa.ChunkedArray, fmt: str) -> pa.ChunkedArray:
    """Timestamps as epoch ms, as ``mapping.epoch_ms`` computes them; null where this cannot say
    (then the record goes one by one)."""
    if fmt == "epoch_ms":
        return raw
    if fmt == "epoch_us":  # Arrow divides toward zero, Python floors: the same from 0 up
        return pc.if_else(pc.greater_equal(raw, 0), pc.divide(raw, 1000), None)
    if fmt == "epoch_s":  # half to even, as Python's round(); exact up to 2**53 ms
        ms = pc.round(pc.multiply(raw, 1000.0), round_mode="half_to_even")
        fits = pc.and_(pc.greater_equal(ms, 0.0), pc.less(ms, float(2**53)))
        return pc.cast(pc.if_else(fits, ms, None), pa.int64())
    # Arrow's own ISO-8601 cast first: a tenth of the cost of the steps below. Every form it
    # takes into a zoned type is one that datetime.fromisoformat takes with the same instant
    # (test_mapping checks a grid of forms), or a year before 1970 that valid_rows refuses; one
    # form it does not take (zone-less, more than 3 fraction digits) fails the whole column.
    try:
        return pc.cast(pc.cast(raw, pa.timestamp("ms", "UTC")), pa.int64())
    except pa.ArrowInvalid:
        pass
    # Only the strict form, by position; other forms go one by one. The common polls (all in
    # that form, all in UTC) skip the steps they do not need.
    strict = pc.match_substring_regex(raw, _ISO)
    if not pc.all(strict).as_py():
        raw = pc.if_else(strict, raw, None)
    base = pc.utf8_slice_codeunits(raw, 0, 19)
    try:  # strict (02-30 is refused), but one bad date fails the whole cast
        secs = pc.cast(pc.cast(base, pa.timestamp("s")), pa.int64())
    except pa.ArrowInvalid:
        # strptime rolls 02-30 over to 03-01: a date must keep its day of the month.
        stamp = pc.strptime(base, format=_BASE, unit="s", error_is_null=True)
        day = pc.cast(pc.utf8_slice_codeunits(base, 8, 10), pa.int64())
        secs = pc.if_else(pc.equal(pc.day(stamp), day), pc.cast(stamp, pa.int64()), None)
    utc = pc.ends_with(raw, "Z")
    if pc.all(utc).as_py():
        frac = pc.utf8_slice_codeunits(raw, 19, -1)
    else:
        frac = pc.if_else(
            utc, pc.utf8_slice_codeunits(raw, 19, -1), pc.utf8_slice_codeunits(raw, 19, -6)
        )
        oh = pc.cast(pc.if_else(utc, "00", pc.utf8_slice_codeunits(raw, -5, -3)), pa.int64())
        om = pc.cast(pc.if_else(utc, "00", pc.utf8_slice_codeunits(raw, -2, None)), pa.int64())
        offset = pc.add(pc.multiply(oh, 3600), pc.multiply(om, 60))
        west = pc.equal(pc.utf8_slice_codeunits(raw, -6, -5), "-")
        secs = pc.subtract(secs, pc.if_else(west, pc.negate(offset), offset))
    ms = pc.cast(pc.utf8_rpad(pc.utf8_slice_codeunits(frac, 1, 4), 3, "0"), pa.int64())
    return pc.add(pc.multiply(secs, 1000), ms)


def _one_by_one_mapped(
    values: Sequence[bytes | None], indices: Sequence[int], cfg: MappingConfig,
    records: Sequence[Record], origin: tuple[str, int],
) -> Decoded:  # fmt: skip
    if not indices:
        return Decoded(DECODED.empty_table(), [])
    cols: dict[str, list[object]] = {n: [] for n in EVENT_COLUMNS}
    taken: list[int] = []
    errors: list[tuple[int, DecodeError]] = []
    dropped: list[int] = []
    for i in indices:
        rec = records[i] if records else None
        key, offset = (rec.key, rec.offset) if rec is not None else (None, 0)
        try:
            e = map_record(cfg, values[i], key, origin[0], origin[1], offset)
        except DecodeError as err:
            errors.append((i, err))
            continue
        if e is None:
            dropped.append(i)
            continue
        for name, val in e.columns().items():
            cols[name].append(val)
        taken.append(i)
    table = pa.Table.from_pydict({**cols, "index": taken}, schema=DECODED)
    return Decoded(table, errors, len(indices), dropped)
