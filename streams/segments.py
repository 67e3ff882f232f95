"""A buffer segment's typed contracts: the footer each Parquet segment carries, the commit log's
entries and state, and the encoding of a segment file.

Only the buffer (``streams.buffer`` and the modules it delegates to) reads and writes segments;
these are the shapes it reads and writes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from streams.errors import CorruptSegmentError
from streams.offsets import OffsetRange, TopicPartition, merge_intervals, parse_tp

META_KEY = b"streamtune"
CRC_IN_NAME = re.compile(r"-c([0-9a-f]{8})\.parquet$")


class SegmentFooter(BaseModel):
    """What a segment's Parquet footer says about it (key ``streamtune`` of the schema metadata)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    v: Literal[1] = Field(default=1, description="Footer format version.")
    ranges: list[tuple[str, int, int, int]] = Field(
        min_length=1,
        description="Covered offsets: (topic, partition, start, end) with end > start.",
    )
    replaces: list[str] = Field(default=[], description="Segments this compacted one replaces.")
    writer: str = Field(default="", description="Ingest member (host:pid) or 'compactor'.")
    rows: int = Field(ge=0, description="Rows in the segment.")
    min_ts: int | None = Field(default=None, description="Oldest event time, epoch ms.")
    max_ts: int | None = Field(default=None, description="Newest event time, epoch ms.")

    @model_validator(mode="after")
    def _check_ranges(self) -> SegmentFooter:
        for _, partition, start, end in self.ranges:
            if partition < 0 or not end > start >= 0:
                raise ValueError(f"bad offset range {start}..{end} of partition {partition}")
        return self


class QuarantineRecord(BaseModel):
    """Why a segment was set aside and which offsets it covered (ingest re-reads them)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(description="The segment's file name (now under quarantine/).")
    reason: str = Field(description="What verification failed.")
    ranges: list[tuple[str, int, int, int]] = Field(
        default=[], description="Offsets it covered, when its footer could still be read."
    )
    at: float = Field(description="When it was quarantined, epoch seconds.")


@dataclass(frozen=True)
class Segment:
    name: str
    rows: int
    ranges: tuple[OffsetRange, ...]
    replaces: tuple[str, ...] = ()
    min_ts: int | None = None
    max_ts: int | None = None
    bytes: int = 0
    writer: str = ""
    fenced: int = 0  # offsets of the append that were refused as already held (not persisted)


class SegmentRecord(BaseModel):
    """A committed segment as the commit log knows it: its object name, size and footer."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(description="Object key of the segment under the buffer's root.")
    bytes: int = Field(ge=0, description="Size of the object.")
    footer: SegmentFooter = Field(description="A copy of the segment's Parquet footer.")


class BufferCommit(BaseModel):
    """One entry of the buffer's commit log: what became visible or went away, atomically."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    add: list[SegmentRecord] = Field(default=[], description="Segments made visible.")
    remove: list[str] = Field(default=[], description="Segments no longer visible.")
    retire: dict[str, int] = Field(
        default={}, description="Resume positions of removed segments ('topic:partition' -> end)."
    )
    quarantine: list[QuarantineRecord] = Field(default=[], description="Segments set aside.")
    writer: str = Field(default="", description="Who committed it (host:pid or 'compactor').")


class BufferState(BaseModel):
    """The buffer as of a log entry: live segments, retired positions, quarantine records."""

    segments: dict[str, SegmentRecord] = Field(default={}, description="Live segments by name.")
    retired: dict[str, int] = Field(default={}, description="Resume positions of deleted data.")
    quarantined: list[QuarantineRecord] = Field(default=[], description="Set-aside segments.")


def apply_commit(state: BufferState, c: BufferCommit) -> BufferState:
    # A new state per entry, never a mutation: another thread may be reading the previous one
    # (the copy is a dict of segment records, cheap beside the segment write itself).
    segments = dict(state.segments)
    for name in c.remove:
        segments.pop(name, None)
    for rec in c.add:
        segments[rec.name] = rec
    retired = dict(state.retired)
    for key, end in c.retire.items():
        retired[key] = max(retired.get(key, 0), end)
    quarantined = [*state.quarantined, *c.quarantine]
    return BufferState.model_construct(segments=segments, retired=retired, quarantined=quarantined)


def coverage(state: BufferState) -> dict[TopicPartition, list[tuple[int, int]]]:
    """Per partition, the merged offset intervals the buffer holds (retired ones included)."""
    spans: dict[TopicPartition, list[tuple[int, int]]] = {}
    for key, end in state.retired.items():
        spans.setdefault(parse_tp(key), []).append((0, end))
    for rec in state.segments.values():
        for topic, part, start, end in rec.footer.ranges:
            spans.setdefault((topic, part), []).append((start, end))
    return {tp: merge_intervals(iv) for tp, iv in spans.items()}


def segment_of(rec: SegmentRecord) -> Segment:
    return segment_from_footer(rec.name, rec.footer, rec.bytes)


def encode(
    table: pa.Table, ranges: tuple[OffsetRange, ...], replaces: tuple[str, ...], writer: str
) -> pa.Buffer:
    """A whole segment file in memory: its bytes are checksummed before they touch the disk."""
    ts = table.column("ts")
    footer = SegmentFooter(
        ranges=[(r.topic, r.partition, r.start, r.end) for r in ranges],
        replaces=list(replaces),
        writer=writer,
        rows=table.num_rows,
        min_ts=pc.min(ts).as_py() if table.num_rows else None,
        max_ts=pc.max(ts).as_py() if table.num_rows else None,
    )
    table = table.replace_schema_metadata({META_KEY: footer.model_dump_json().encode()})
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue()


def footer_of(schema: pa.Schema) -> SegmentFooter:
    raw = (schema.metadata or {}).get(META_KEY)
    if raw is None:
        raise CorruptSegmentError("footer", "no streamtune metadata in the Parquet footer")
    try:
        return SegmentFooter.model_validate_json(raw)
    except ValidationError as err:
        raise CorruptSegmentError("footer", f"invalid streamtune metadata: {err}") from None


def segment_from_footer(name: str, footer: SegmentFooter, size: int) -> Segment:
    return Segment(
        name=name,
        rows=footer.rows,
        ranges=tuple(OffsetRange(t, p, s, e) for t, p, s, e in footer.ranges),
        replaces=tuple(footer.replaces),
        min_ts=footer.min_ts,
        max_ts=footer.max_ts,
        bytes=size,
        writer=footer.writer,
    )


def with_fenced(seg: Segment, fenced: int) -> Segment:
    return Segment(
        name=seg.name, rows=seg.rows, ranges=seg.ranges, replaces=seg.replaces,
        min_ts=seg.min_ts, max_ts=seg.max_ts, bytes=seg.bytes, writer=seg.writer, fenced=fenced,
    )  # fmt: skip


def crc_of(name: str) -> int | None:
    """The CRC-32 recorded in a segment's name (segments written before it had none)."""
    m = CRC_IN_NAME.search(name)
    return int(m.group(1), 16) if m else None


def overlaps(
    seg: Segment,
    after: dict[TopicPartition, int],
    upto: dict[TopicPartition, int] | None,
    start_ts: int | None,
    end_ts: int | None,
) -> bool:
    if seg.rows == 0:
        return False
    if start_ts is not None and seg.max_ts is not None and seg.max_ts < start_ts:
        return False
    if end_ts is not None and seg.min_ts is not None and seg.min_ts >= end_ts:
        return False
    for r in seg.ranges:
        lo = after.get((r.topic, r.partition), 0)
        hi = upto.get((r.topic, r.partition), 0) if upto is not None else None
        if r.end > lo and (hi is None or r.start < hi):
            return True
    return False
