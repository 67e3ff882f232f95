"""Kafka offset ranges and the arithmetic of coverage: which offsets a set of ranges holds, what is
left of a batch once the held ones are taken away, and the rows of a table that fall in a range.

The buffer's exactly-once fence is this arithmetic applied to the commit log's state.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

from streams.errors import EventBufferError

TopicPartition = tuple[str, int]
Watermark = dict[str, int]  # "topic:partition" -> next offset not yet included


def tp_key(topic: str, partition: int) -> str:
    return f"{topic}:{partition}"


def parse_tp(key: str) -> TopicPartition:
    topic, _, partition = key.rpartition(":")
    if not topic or not partition.isdigit():
        raise EventBufferError(f"watermark key {key!r} is not 'topic:partition'")
    return topic, int(partition)


@dataclass(frozen=True)
class OffsetRange:
    topic: str
    partition: int
    start: int  # first offset covered
    end: int  # one past the last offset covered

    def __post_init__(self) -> None:
        if not self.end > self.start >= 0:
            raise EventBufferError(f"empty or negative offset range {self}")


def merge_intervals(intervals: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for start, end in sorted(intervals):
        if out and start <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], end))
        else:
            out.append((start, end))
    return out


def first_uncovered(covered: list[tuple[int, int]], start: int, end: int) -> int | None:
    """The first offset of [start, end) outside the merged intervals ``covered``, if any."""
    pos = start
    for cs, ce in covered:
        if ce <= pos:
            continue
        if cs > pos:
            break
        pos = ce
        if pos >= end:
            return None
    return pos if pos < end else None


def subtract(
    ranges: tuple[OffsetRange, ...], covered: dict[TopicPartition, list[tuple[int, int]]]
) -> tuple[OffsetRange, ...]:
    """``ranges`` less every offset in ``covered``; may split a range in pieces."""
    out: list[OffsetRange] = []
    for r in ranges:
        pieces = [(r.start, r.end)]
        for cs, ce in covered.get((r.topic, r.partition), []):
            nxt = []
            for s, e in pieces:
                if ce <= s or cs >= e:
                    nxt.append((s, e))
                    continue
                if s < cs:
                    nxt.append((s, cs))
                if ce < e:
                    nxt.append((ce, e))
            pieces = nxt
        out.extend(OffsetRange(r.topic, r.partition, s, e) for s, e in pieces)
    return tuple(out)


def count(ranges: tuple[OffsetRange, ...]) -> int:
    return sum(r.end - r.start for r in ranges)


def describe(ranges: tuple[OffsetRange, ...]) -> str:
    return ", ".join(f"{r.topic}:{r.partition}@[{r.start},{r.end})" for r in ranges[:8]) + (
        f" and {len(ranges) - 8} more" if len(ranges) > 8 else ""
    )


def rows_in(table: pa.Table, ranges: tuple[OffsetRange, ...]) -> pa.Table:
    """The rows of ``table`` whose (topic, partition, offset) lies in one of ``ranges``."""
    mask = None
    for r in ranges:
        m = pc.and_(
            pc.and_(pc.equal(table["topic"], r.topic), pc.equal(table["partition"], r.partition)),
            pc.and_(pc.greater_equal(table["offset"], r.start), pc.less(table["offset"], r.end)),
        )
        mask = m if mask is None else pc.or_(mask, m)
    return table.filter(mask) if mask is not None else table.slice(0, 0)


def coalesce(ranges: list[OffsetRange]) -> tuple[OffsetRange, ...]:
    by_tp: dict[TopicPartition, list[OffsetRange]] = {}
    for r in ranges:
        by_tp.setdefault((r.topic, r.partition), []).append(r)
    out: list[OffsetRange] = []
    for (topic, part), rs in sorted(by_tp.items()):
        rs.sort(key=lambda r: r.start)
        cur = rs[0]
        for r in rs[1:]:
            if r.start <= cur.end:
                cur = OffsetRange(topic, part, cur.start, max(cur.end, r.end))
            else:
                out.append(cur)
                cur = r
        out.append(cur)
    return tuple(out)


def filter_rows(
    t: pa.Table,
    after: dict[TopicPartition, int],
    upto: dict[TopicPartition, int] | None,
    start_ts: int | None,
    end_ts: int | None,
) -> pa.Table:
    mask = None

    def both(a: pa.ChunkedArray | pa.Array, b: pa.ChunkedArray | pa.Array | None) -> pa.Array:
        return a if b is None else pc.and_(a, b)

    if start_ts is not None:
        mask = both(pc.greater_equal(t["ts"], start_ts), mask)
    if end_ts is not None:
        mask = both(pc.less(t["ts"], end_ts), mask)
    if after or upto is not None:
        # Per-partition bounds, expressed as a lookup on the "topic:partition" key of each row.
        keys = pc.binary_join_element_wise(t["topic"], pc.cast(t["partition"], pa.string()), ":")
        tps = sorted(set(after) | set(upto or {}))
        names = pa.array([tp_key(*tp) for tp in tps])
        idx = pc.index_in(keys, value_set=names)
        lo_vals = pa.array([after.get(tp, 0) for tp in tps] + [0], pa.int64())
        lo = pc.take(lo_vals, pc.fill_null(idx, len(tps)))
        offset_mask = pc.greater_equal(t["offset"], lo)
        if upto is not None:
            # A partition the upper watermark does not name has nothing below it.
            hi_vals = pa.array([upto.get(tp, 0) for tp in tps] + [0], pa.int64())
            hi = pc.take(hi_vals, pc.fill_null(idx, len(tps)))
            offset_mask = pc.and_(offset_mask, pc.less(t["offset"], hi))
        mask = both(offset_mask, mask)
    return t if mask is None else t.filter(mask)
