"""The durable event buffer: immutable Parquet segments that record which Kafka offsets they cover.

Every segment carries, in its Parquet footer, the (topic, partition, [start, end)) offset ranges it
covers, so the buffer itself, not Kafka's committed offsets, is the source of truth for what was
ingested: on restart a consumer resumes from ``next_offsets()``.

The buffer lives in a local directory or under an object-store prefix (``streams.storage``). A
segment object is written whole under a unique key and is invisible until an entry of the buffer's
commit log (``_log/``, ``streams.commitlog``) names it. Appending that entry is a create-only
write that exactly one writer wins, and the winner decided on the freshest state: so no offset is
ever covered twice, on a local disk or on S3 alike. An append first subtracts the offsets live
segments already cover (a stale member, paused past its session while another took its
partitions, is fenced: ``FencedError`` when nothing is left). A crash at any point leaves a
segment either committed whole or an unreferenced object that maintenance deletes later.

A segment's name carries the CRC-32 of its bytes. A segment whose bytes or row count fail
verification is moved to ``quarantine/`` and a log entry records the offsets it covered; its rows
are never returned, and ``next_offsets()`` goes back to the first offset it no longer covers so
that ingest re-reads them from Kafka.

Compaction writes a merged segment and commits "add merged, remove its inputs" in one entry, so
readers see the inputs or the merged segment, never both. Retention commits the removal of old
segments together with their resume positions.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import re
import time
import uuid
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from streams.commitlog import CommitLog
from streams.config import BufferConfig
from streams.errors import (
    BufferWriteError,
    CorruptSegmentError,
    DiskFullError,
    EventBufferError,
    FencedError,
)
from streams.events import ARROW_SCHEMA
from streams.storage import Storage, open_storage

log = logging.getLogger(__name__)

TopicPartition = tuple[str, int]
Watermark = dict[str, int]  # "topic:partition" -> next offset not yet included

_META_KEY = b"streamtune"
_CRC_IN_NAME = re.compile(r"-c([0-9a-f]{8})\.parquet$")
_NS_IN_NAME = re.compile(r"^seg-(\d{20})-")
QUARANTINE = "quarantine"
LOG = "_log"
ORPHAN_AFTER_S = 3600  # an uncommitted segment object older than this is abandoned, not in flight


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


@dataclass
class BufferStats:
    segments: int = 0
    rows: int = 0
    bytes: int = 0
    partitions: dict[str, int] = field(default_factory=dict)
    quarantined: int = 0


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


def _apply(state: BufferState, c: BufferCommit) -> BufferState:
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


def _write_error(where: str, err: OSError) -> BufferWriteError:
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        return DiskFullError(where, f"disk full ({err.strerror}); nothing of it is visible")
    return BufferWriteError(where, f"{err.strerror or err}; nothing of it is visible")


class EventBuffer:
    """Parquet segments under a directory or object-store prefix, shared by any number of
    ingest processes and readers on any number of machines."""

    def __init__(self, cfg: BufferConfig) -> None:
        self.cfg = cfg
        self.storage: Storage = open_storage(cfg.path, cfg.storage)
        self.log = CommitLog(self.storage, LOG, BufferState, BufferCommit, _apply)
        self._adopt_legacy()

    @property
    def root(self) -> Path:
        """The local directory behind the buffer (local buffers only)."""
        root = self.storage.local_root
        if root is None:
            raise EventBufferError(f"the buffer at {self.storage.uri} is not a local directory")
        return root

    # -- writing ------------------------------------------------------------------------
    def append(self, table: pa.Table, ranges: list[OffsetRange], writer: str = "") -> Segment:
        """Durably add one segment covering ``ranges`` (it may hold no rows: all dead-lettered).

        Offsets the buffer already covers are dropped, rows included (``Segment.fenced`` counts
        them); ``FencedError`` if nothing is left. ``DiskFullError``/``BufferWriteError`` if the
        segment could not be written, in which case nothing of it is visible.
        """
        if not ranges:
            raise EventBufferError("a segment must cover at least one offset range")
        table = table.cast(ARROW_SCHEMA)
        wanted = tuple(ranges)
        # The slow part (encode, upload, fsync) happens before the commit; only the coverage check
        # and the create-only log entry are retried when another writer commits first.
        staged = self._stage(_encode(table, wanted, (), writer))
        current: list[tuple[tuple[OffsetRange, ...], SegmentRecord]] = [(wanted, staged)]

        def decide(state: BufferState) -> BufferCommit | None:
            ranges_now, rec = current[0]
            if rec.name in state.segments:
                # A reader opening a buffer whose log was still empty adopted the staged object
                # as a legacy segment (``_adopt_legacy``): it is committed; deleting it now would
                # leave the log naming a segment that is gone.
                return None
            kept = _subtract(wanted, _coverage(state))
            if kept != ranges_now:
                self.storage.delete(rec.name)
                if not kept:
                    raise FencedError(
                        f"refused {_count(wanted)} offsets from {writer or 'a writer'} "
                        f"({_describe(wanted)}): the buffer already holds all of them"
                    )
                rec = self._stage(_encode(_rows_in(table, kept), kept, (), writer))
                current[0] = (kept, rec)
            return BufferCommit(add=[rec], writer=writer)

        try:
            self._commit(decide)
        except BaseException:
            # Unless a log entry names it after all (adopted, or the failure came after the
            # entry was written): an orphan is collected later, a named object never comes back.
            with contextlib.suppress(Exception):
                if current[0][1].name not in self.log.refresh().segments:
                    self.storage.delete(current[0][1].name)
            raise
        kept, rec = current[0]
        seg = _segment(rec)
        if kept != wanted:
            fenced = _count(wanted) - _count(kept)
            log.warning(
                "fenced %d offsets of %s already held by the buffer; wrote %s",
                fenced, writer or "a writer", _describe(kept),
            )  # fmt: skip
            return _with_fenced(seg, fenced)
        return seg

    def _stage(self, data: pa.Buffer) -> SegmentRecord:
        """Write a segment object that no reader sees until a log entry names it."""
        name = f"seg-{time.time_ns():020d}-{uuid.uuid4().hex[:8]}-c{zlib.crc32(data):08x}.parquet"
        try:
            self.storage.write(name, data.to_pybytes())
        except OSError as err:
            raise _write_error(f"{self.storage.uri}/{name}", err) from err
        footer = _footer_of(pq.read_schema(pa.BufferReader(data)))
        return SegmentRecord(name=name, bytes=len(data), footer=footer)

    def _commit(
        self, decide: Callable[[BufferState], BufferCommit | None]
    ) -> tuple[BufferCommit, int] | None:
        try:
            return self.log.append(decide)
        except OSError as err:
            raise _write_error(f"{self.storage.uri}/{LOG}", err) from err

    def _adopt_legacy(self) -> None:
        """A buffer written before the commit log existed: commit its live segments once."""
        if self.log.refresh().segments or self.log.next_entry > 0:
            return
        names = [o.key for o in self.storage.list("seg-")]
        try:
            retired: dict[str, int] = json.loads(self.storage.read("offsets.json"))
        except FileNotFoundError:
            retired = {}
        if not names and not retired:
            return
        recs = []
        for name in names:
            try:
                data = self.storage.read(name)
                footer = _footer_of(pq.read_schema(pa.BufferReader(data)))
            except (FileNotFoundError, pa.ArrowException, OSError, CorruptSegmentError):
                continue  # the next read of its offsets finds the hole; ingest refills it
            recs.append(SegmentRecord(name=name, bytes=len(data), footer=footer))
        replaced = {r for rec in recs for r in rec.footer.replaces}
        live = [r for r in recs if r.name not in replaced]
        self.log.append(
            lambda st: (
                None
                if st.segments or self.log.next_entry > 0
                else BufferCommit(add=live, retire=retired, writer="adopt")
            )
        )
        log.info("adopted %d segments of a buffer written before its commit log", len(live))

    # -- the index ----------------------------------------------------------------------
    def segments(self) -> list[Segment]:
        """Live segments in creation order, as the commit log has them."""
        state = self.log.refresh()
        return [_segment(state.segments[n]) for n in sorted(state.segments)]

    def next_offsets(self) -> dict[TopicPartition, int]:
        """Per partition, the first offset the buffer does not hold: where ingest resumes.

        That is past the newest covered offset, or the first offset of a quarantined segment that
        nothing covers yet, so ingest re-reads it from Kafka.
        """
        state = self.log.refresh()
        nxt: dict[TopicPartition, int] = {parse_tp(k): v for k, v in state.retired.items()}
        for rec in state.segments.values():
            for topic, part, _, end in rec.footer.ranges:
                nxt[(topic, part)] = max(nxt.get((topic, part), 0), end)
        if state.quarantined:
            covered = _coverage(state)
            for q in state.quarantined:
                for topic, part, start, end in q.ranges:
                    hole = _first_uncovered(covered.get((topic, part), []), start, end)
                    if hole is not None:
                        nxt[(topic, part)] = min(nxt.get((topic, part), hole), hole)
        return nxt

    def watermark(self) -> Watermark:
        return {tp_key(t, p): o for (t, p), o in sorted(self.next_offsets().items())}

    def stats(self) -> BufferStats:
        segs = self.segments()
        return BufferStats(
            segments=len(segs),
            rows=sum(s.rows for s in segs),
            bytes=sum(s.bytes for s in segs),
            partitions=self.watermark(),
            quarantined=self.quarantine_count(),
        )

    # -- quarantine ---------------------------------------------------------------------
    def quarantined(self) -> list[QuarantineRecord]:
        """Segments set aside as corrupt, oldest first."""
        return list(self.log.refresh().quarantined)

    def quarantine_count(self) -> int:
        return len(self.log.refresh().quarantined)

    def _quarantine(self, seg: Segment, reason: str, data: bytes | None) -> None:
        """Set a segment that failed verification aside, recording the offsets it covered."""
        ranges = [(r.topic, r.partition, r.start, r.end) for r in seg.ranges]
        record = QuarantineRecord(name=seg.name, reason=reason, ranges=ranges, at=time.time())
        # The log entry first: once the segment is gone, its offsets must already count as a hole.
        done = self._commit(
            lambda st: (
                BufferCommit(remove=[seg.name], quarantine=[record], writer="verifier")
                if seg.name in st.segments
                else None
            )  # another reader quarantined (or compaction replaced) it first
        )
        if done is None:
            return
        if data is not None:
            self.storage.write(f"{QUARANTINE}/{seg.name}", data)  # kept for a post-mortem
        self.storage.delete(seg.name)
        log.error(
            "quarantined corrupt segment %s/%s (%s); its offsets %s will be re-read from Kafka",
            self.storage.uri, seg.name, reason, ranges,
        )  # fmt: skip

    def _load(self, seg: Segment) -> pa.Table:
        """A segment's rows, verified (CRC in its name, Parquet structure, row count)."""
        data = self.storage.read(seg.name)
        expected = _crc_of(seg.name)
        problem = None
        if expected is not None and zlib.crc32(data) != expected:
            problem = f"CRC-32 {zlib.crc32(data):08x} != {expected:08x} recorded in its name"
        else:
            try:
                table = pq.read_table(pa.BufferReader(data))
            except (pa.ArrowException, OSError) as err:
                problem = f"unreadable Parquet: {err}"
            else:
                if table.num_rows != seg.rows:
                    problem = f"{table.num_rows} rows, footer says {seg.rows}"
        if problem is not None:
            self._quarantine(seg, problem, data)
            raise CorruptSegmentError(f"{self.storage.uri}/{seg.name}", problem)
        return table

    # -- reading ------------------------------------------------------------------------
    def plan(
        self,
        after: Mapping[str, int] | None = None,
        upto: Mapping[str, int] | None = None,
        start_ts: int | None = None,
        end_ts: int | None = None,
    ) -> list[Segment]:
        """The live segments that hold rows in [after, upto) and [start_ts, end_ts)."""
        after_tp = {parse_tp(k): v for k, v in (after or {}).items()}
        upto_tp = {parse_tp(k): v for k, v in upto.items()} if upto is not None else None
        return [s for s in self.segments() if _overlaps(s, after_tp, upto_tp, start_ts, end_ts)]

    def read(
        self,
        after: Mapping[str, int] | None = None,
        upto: Mapping[str, int] | None = None,
        start_ts: int | None = None,
        end_ts: int | None = None,
        columns: list[str] | None = None,
        segments: list[Segment] | None = None,
    ) -> pa.Table:
        """Events with offsets in [after, upto) per partition and ts in [start_ts, end_ts).

        ``after``/``upto`` are watermarks ("topic:partition" -> offset); a partition missing from
        ``after`` starts at 0; ``upto`` is a snapshot, so a partition it does not name contributes
        nothing (pass ``upto=None`` for no upper bound). Rows come sorted by
        (ts, partition, offset), so training sees each user's events in time order. A segment
        that fails verification is quarantined and contributes no rows. ``segments`` restricts
        the read to a plan made earlier (``plan``), e.g. by a driver that hands it to a worker.
        """
        after_tp = {parse_tp(k): v for k, v in (after or {}).items()}
        upto_tp = {parse_tp(k): v for k, v in upto.items()} if upto is not None else None
        while True:
            planned = segments if segments is not None else self.plan(after, upto, start_ts, end_ts)
            parts = self._read_planned(planned, after_tp, upto_tp, start_ts, end_ts)
            if parts is not None:
                break
            if segments is not None:  # a caller's plan went stale (compaction): it must plan again
                raise FileNotFoundError(f"{self.storage.uri}: a planned segment is gone")
        if not parts:
            out = ARROW_SCHEMA.empty_table()
        else:
            out = pa.concat_tables(parts).sort_by(
                [("ts", "ascending"), ("partition", "ascending"), ("offset", "ascending")]
            )
        return out.select(columns) if columns else out

    def _read_planned(
        self, planned: list[Segment], after_tp: dict[TopicPartition, int],
        upto_tp: dict[TopicPartition, int] | None, start_ts: int | None, end_ts: int | None,
    ) -> list[pa.Table] | None:  # fmt: skip
        """The planned segments' rows in range; None when one is gone (plan again)."""
        parts: list[pa.Table] = []
        for seg in planned:
            try:
                t = self._load(seg)
            except FileNotFoundError:
                if seg.name in self.log.refresh().segments:
                    # Still named by the log, yet gone: lost, not replaced. Recorded as a hole
                    # like a corrupt segment, so ingest re-reads its offsets from Kafka.
                    self._quarantine(seg, "object missing", None)
                return None
            except CorruptSegmentError:
                continue  # quarantined and logged; ingest re-reads its offsets
            t = _filter(t, after_tp, upto_tp, start_ts, end_ts)
            if t.num_rows:
                parts.append(t.replace_schema_metadata(None))
        return parts

    # -- maintenance --------------------------------------------------------------------
    def compact(self) -> int:
        """Merge runs of small segments; returns how many segments were replaced."""
        replaced = 0
        self._delete_orphans()
        small = [s for s in self.segments() if s.rows < self.cfg.compact_below_rows]
        group: list[Segment] = []
        for seg in [*small, None]:
            if seg is not None and sum(s.rows for s in group) + seg.rows <= (
                self.cfg.compact_target_rows
            ):
                group.append(seg)
                continue
            if len(group) > 1 and self._merge(group):
                replaced += len(group)
            group = [seg] if seg is not None else []
        return replaced

    def _merge(self, group: list[Segment]) -> bool:
        try:
            tables = [self._load(s).replace_schema_metadata(None) for s in group]
        except (CorruptSegmentError, FileNotFoundError) as err:
            log.warning("compaction skipped a group: %s", err)  # merged on a later pass
            return False
        merged = pa.concat_tables(tables)
        ranges = _coalesce([r for s in group for r in s.ranges])
        names = [s.name for s in group]
        rec = self._stage(_encode(merged, ranges, tuple(names), "compactor"))
        done = self._commit(
            lambda st: (
                BufferCommit(add=[rec], remove=names, writer="compactor")
                if all(n in st.segments for n in names)
                else None
            )  # another compactor, retention or quarantine got there first
        )
        self._delete([s.name for s in group] if done else [rec.name])
        return done is not None

    def _delete_orphans(self) -> None:
        """Delete segment objects no log entry names that are too old to be a commit in flight."""
        state = self.log.refresh()
        # Inputs of a committed compaction are dead at once; anything else only once it is too
        # old to be a segment whose commit is still in flight.
        replaced = {r for rec in state.segments.values() for r in rec.footer.replaces}
        cutoff = time.time_ns() - ORPHAN_AFTER_S * 1_000_000_000
        for obj in self.storage.list("seg-"):
            if obj.key in state.segments:
                continue
            m = _NS_IN_NAME.match(obj.key)
            if obj.key in replaced or (m is not None and int(m.group(1)) < cutoff):
                self.storage.delete(obj.key)

    def apply_retention(self, now_ms: int | None = None) -> int:
        """Delete segments whose newest event is older than the retention; returns how many."""
        if self.cfg.retention_hours is None:
            return 0
        now_ms = now_ms if now_ms is not None else int(time.time() * 1000)
        cutoff = now_ms - int(self.cfg.retention_hours * 3_600_000)
        gone: list[str] = []

        def decide(state: BufferState) -> BufferCommit | None:
            old = [r for r in state.segments.values() if r.footer.max_ts is not None]
            old = [r for r in old if r.footer.max_ts is not None and r.footer.max_ts < cutoff]
            if not old:
                return None
            retire: dict[str, int] = {}
            for rec in old:
                for topic, part, _, end in rec.footer.ranges:
                    key = tp_key(topic, part)
                    retire[key] = max(retire.get(key, 0), end)
            gone[:] = [r.name for r in old]
            # Removal and resume positions in one entry: no crash can rewind ingest.
            return BufferCommit(remove=list(gone), retire=retire, writer="retention")

        if self._commit(decide) is None:
            return 0
        self._delete(gone)
        return len(gone)

    def _delete(self, names: list[str]) -> None:
        for name in names:
            self.storage.delete(name)


def _coverage(state: BufferState) -> dict[TopicPartition, list[tuple[int, int]]]:
    """Per partition, the merged offset intervals the buffer holds (retired ones included)."""
    spans: dict[TopicPartition, list[tuple[int, int]]] = {}
    for key, end in state.retired.items():
        spans.setdefault(parse_tp(key), []).append((0, end))
    for rec in state.segments.values():
        for topic, part, start, end in rec.footer.ranges:
            spans.setdefault((topic, part), []).append((start, end))
    return {tp: _merge_intervals(iv) for tp, iv in spans.items()}


def _segment(rec: SegmentRecord) -> Segment:
    return _segment_from_footer(rec.name, rec.footer, rec.bytes)


def _encode(
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
    table = table.replace_schema_metadata({_META_KEY: footer.model_dump_json().encode()})
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue()


def _footer_of(schema: pa.Schema) -> SegmentFooter:
    raw = (schema.metadata or {}).get(_META_KEY)
    if raw is None:
        raise CorruptSegmentError("footer", "no streamtune metadata in the Parquet footer")
    try:
        return SegmentFooter.model_validate_json(raw)
    except ValidationError as err:
        raise CorruptSegmentError("footer", f"invalid streamtune metadata: {err}") from None


def _segment_from_footer(name: str, footer: SegmentFooter, size: int) -> Segment:
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


def _with_fenced(seg: Segment, fenced: int) -> Segment:
    return Segment(
        name=seg.name, rows=seg.rows, ranges=seg.ranges, replaces=seg.replaces,
        min_ts=seg.min_ts, max_ts=seg.max_ts, bytes=seg.bytes, writer=seg.writer, fenced=fenced,
    )  # fmt: skip


def _crc_of(name: str) -> int | None:
    """The CRC-32 recorded in a segment's name (segments written before it had none)."""
    m = _CRC_IN_NAME.search(name)
    return int(m.group(1), 16) if m else None


def _merge_intervals(intervals: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for start, end in sorted(intervals):
        if out and start <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], end))
        else:
            out.append((start, end))
    return out


def _first_uncovered(covered: list[tuple[int, int]], start: int, end: int) -> int | None:
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


def _subtract(
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


def _count(ranges: tuple[OffsetRange, ...]) -> int:
    return sum(r.end - r.start for r in ranges)


def _describe(ranges: tuple[OffsetRange, ...]) -> str:
    return ", ".join(f"{r.topic}:{r.partition}@[{r.start},{r.end})" for r in ranges[:8]) + (
        f" and {len(ranges) - 8} more" if len(ranges) > 8 else ""
    )


def _rows_in(table: pa.Table, ranges: tuple[OffsetRange, ...]) -> pa.Table:
    """The rows of ``table`` whose (topic, partition, offset) lies in one of ``ranges``."""
    mask = None
    for r in ranges:
        m = pc.and_(
            pc.and_(pc.equal(table["topic"], r.topic), pc.equal(table["partition"], r.partition)),
            pc.and_(pc.greater_equal(table["offset"], r.start), pc.less(table["offset"], r.end)),
        )
        mask = m if mask is None else pc.or_(mask, m)
    return table.filter(mask) if mask is not None else table.slice(0, 0)


def _coalesce(ranges: list[OffsetRange]) -> tuple[OffsetRange, ...]:
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


def _overlaps(
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


def _filter(
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
