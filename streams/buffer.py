"""The durable event buffer: immutable Parquet segments that record which Kafka offsets they cover.

Every segment carries, in its Parquet footer, the (topic, partition, [start, end)) offset ranges it
covers, so the buffer itself, not Kafka's committed offsets, is the source of truth for what was
ingested: on restart a consumer resumes from ``next_offsets()``. A segment becomes visible only by
an atomic rename after its bytes are fsynced, so a crash at any point leaves either the whole
segment or none of it; a failed write (a full disk) removes its temp file and raises.

No offset is ever covered twice: ``append`` subtracts, under a lock shared by every process, the
offsets live segments already cover, so a stale member (paused past its session while another took
its partitions) cannot land a batch a second time (``FencedError`` when nothing is left).

A segment's name carries the CRC-32 of its bytes. A segment whose bytes, footer or row count fail
verification is moved to ``quarantine/`` with a record of the offsets it covered; its rows are never
returned, and ``next_offsets()`` goes back to the first offset it no longer covers so that ingest
re-reads them from Kafka.

Compaction merges small segments into one whose footer names the segments it replaces; readers
ignore replaced segments even if a crash left them behind, so compaction never duplicates rows.
Retention deletes old segments but first folds their offsets into ``offsets.json`` so resume
positions survive the deletion.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import re
import time
import uuid
import zlib
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from streams.config import BufferConfig
from streams.errors import (
    BufferWriteError,
    CorruptSegmentError,
    DiskFullError,
    EventBufferError,
    FencedError,
)
from streams.events import ARROW_SCHEMA

log = logging.getLogger(__name__)

TopicPartition = tuple[str, int]
Watermark = dict[str, int]  # "topic:partition" -> next offset not yet included

_META_KEY = b"streamtune"
_CRC_IN_NAME = re.compile(r"-c([0-9a-f]{8})\.parquet$")
QUARANTINE = "quarantine"


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


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write, fsync, rename, fsync the directory: readers see the old or the new file, whole."""
    tmp = path.with_name(f".tmp-{path.name}-{uuid.uuid4().hex[:8]}")
    try:
        with tmp.open("wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def _write_error(path: Path, err: OSError) -> BufferWriteError:
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        return DiskFullError(path, f"disk full ({err.strerror}); nothing of it is visible")
    return BufferWriteError(path, f"{err.strerror or err}; nothing of it is visible")


class EventBuffer:
    """A directory of Parquet segments shared by any number of ingest processes and readers."""

    def __init__(self, cfg: BufferConfig) -> None:
        self.cfg = cfg
        self.root = cfg.path
        self.root.mkdir(parents=True, exist_ok=True)
        self._cache: dict[str, Segment] = {}

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
        # The slow part (encode, write, fsync) runs outside the lock; only the coverage check and
        # the rename are serialised across processes.
        data = _encode(table, wanted, (), writer)
        tmp, final = self._stage(data)
        try:
            with self._append_lock():
                kept = _subtract(wanted, self._coverage())
                if kept != wanted:
                    tmp.unlink(missing_ok=True)
                    fenced = _count(wanted) - _count(kept)
                    if not kept:
                        raise FencedError(
                            f"refused {fenced} offsets from {writer or 'a writer'} "
                            f"({_describe(wanted)}): the buffer already holds all of them"
                        )
                    table = _rows_in(table, kept)
                    data = _encode(table, kept, (), writer)
                    tmp, final = self._stage(data)
                    seg = self._publish(tmp, final, data)
                    log.warning(
                        "fenced %d offsets of %s already held by the buffer; wrote %s",
                        fenced, writer or "a writer", _describe(kept),
                    )  # fmt: skip
                    return _with_fenced(seg, fenced)
                return self._publish(tmp, final, data)
        finally:
            tmp.unlink(missing_ok=True)

    def _write(
        self,
        table: pa.Table,
        ranges: tuple[OffsetRange, ...],
        replaces: tuple[str, ...],
        writer: str = "compactor",
    ) -> Segment:
        data = _encode(table, ranges, replaces, writer)
        tmp, final = self._stage(data)
        try:
            return self._publish(tmp, final, data)
        finally:
            tmp.unlink(missing_ok=True)

    def _stage(self, data: pa.Buffer) -> tuple[Path, Path]:
        """Write ``data`` to a fsynced temp file; returns (temp, final path). Cleans up on error."""
        name = f"seg-{time.time_ns():020d}-{uuid.uuid4().hex[:8]}-c{zlib.crc32(data):08x}.parquet"
        final = self.root / name
        tmp = self.root / f".tmp-{name}"
        try:
            with tmp.open("wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
        except OSError as err:
            tmp.unlink(missing_ok=True)
            raise _write_error(final, err) from err
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return tmp, final

    def _publish(self, tmp: Path, final: Path, data: pa.Buffer) -> Segment:
        try:
            os.rename(tmp, final)
            fsync_dir(self.root)
        except OSError as err:
            raise _write_error(final, err) from err
        footer = _footer_of(pq.read_schema(pa.BufferReader(data)))
        seg = _segment_from_footer(final.name, footer, len(data))
        self._cache[final.name] = seg
        return seg

    @contextmanager
    def _append_lock(self) -> Iterator[None]:
        # Serialises "check coverage, then rename" across ingest processes (a stale member's fence).
        with (self.root / ".append.lock").open("a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def _coverage(self) -> dict[TopicPartition, list[tuple[int, int]]]:
        """Per partition, the merged offset intervals the buffer holds (retired ones included)."""
        spans: dict[TopicPartition, list[tuple[int, int]]] = {}
        for key, end in self._retired_offsets().items():
            spans.setdefault(parse_tp(key), []).append((0, end))
        for seg in self.segments(stable=True):
            for r in seg.ranges:
                spans.setdefault((r.topic, r.partition), []).append((r.start, r.end))
        return {tp: _merge_intervals(iv) for tp, iv in spans.items()}

    # -- the index ----------------------------------------------------------------------
    def segments(self, stable: bool = False) -> list[Segment]:
        """Live segments in creation order (replaced ones, and temp files, are ignored).

        ``stable``: re-list if a segment vanished while its footer was read (compaction renames
        the merged segment before deleting its inputs, so a re-list sees the merged one).
        """
        while True:
            names = sorted(p.name for p in self.root.glob("seg-*.parquet"))
            segs = []
            vanished = False
            for name in names:
                seg = self._cache.get(name)
                if seg is None:
                    seg = self._read_meta(name)
                    if seg is None:  # deleted under us by compaction, retention or quarantine
                        vanished = True
                        continue
                    self._cache[name] = seg
                segs.append(seg)
            if not (stable and vanished):
                break
        replaced = {r for s in segs for r in s.replaces}
        return [s for s in segs if s.name not in replaced]

    def _read_meta(self, name: str) -> Segment | None:
        path = self.root / name
        try:
            schema = pq.read_schema(path)
            size = path.stat().st_size
        except FileNotFoundError:
            return None
        except (pa.ArrowException, OSError) as err:
            self._quarantine(name, f"unreadable footer: {err}")
            return None
        try:
            footer = _footer_of(schema)
        except CorruptSegmentError as err:
            self._quarantine(name, str(err))
            return None
        return _segment_from_footer(name, footer, size)

    def next_offsets(self) -> dict[TopicPartition, int]:
        """Per partition, the first offset the buffer does not hold: where ingest resumes.

        That is past the newest covered offset, or the first offset of a quarantined segment that
        nothing covers yet, so ingest re-reads it from Kafka.
        """
        nxt: dict[TopicPartition, int] = {
            parse_tp(k): v for k, v in self._retired_offsets().items()
        }
        for seg in self.segments():
            for r in seg.ranges:
                tp = (r.topic, r.partition)
                nxt[tp] = max(nxt.get(tp, 0), r.end)
        records = self.quarantined()
        if records:
            covered = self._coverage()
            for rec in records:
                for topic, part, start, end in rec.ranges:
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
        out = []
        for p in sorted((self.root / QUARANTINE).glob("*.json")):
            try:
                out.append(QuarantineRecord.model_validate_json(p.read_bytes()))
            except (OSError, ValidationError):
                log.warning("unreadable quarantine record %s", p)
        return out

    def quarantine_count(self) -> int:
        """How many segments were quarantined (cheap: one directory listing)."""
        qdir = self.root / QUARANTINE
        return sum(1 for _ in qdir.glob("*.json")) if qdir.exists() else 0

    def _quarantine(self, name: str, reason: str) -> None:
        """Move a segment that failed verification aside, recording the offsets it covered."""
        src = self.root / name
        seg = self._cache.pop(name, None)
        ranges = [(r.topic, r.partition, r.start, r.end) for r in seg.ranges] if seg else []
        if not ranges:
            ranges = _salvage_ranges(src)
        qdir = self.root / QUARANTINE
        qdir.mkdir(exist_ok=True)
        record = QuarantineRecord(name=name, reason=reason, ranges=ranges, at=time.time())
        # The record first: once the segment is gone, its offsets must already count as a hole.
        atomic_write_bytes(qdir / f"{name}.json", record.model_dump_json().encode())
        try:
            os.replace(src, qdir / name)
        except FileNotFoundError:  # another reader quarantined it first
            return
        fsync_dir(self.root)
        log.error(
            "quarantined corrupt segment %s (%s); its offsets %s will be re-read from Kafka",
            src, reason, ranges or "(unknown: footer unreadable)",
        )  # fmt: skip

    def _load(self, seg: Segment) -> pa.Table:
        """A segment's rows, verified (CRC in its name, Parquet structure, row count)."""
        path = self.root / seg.name
        data = path.read_bytes()
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
            self._quarantine(seg.name, problem)
            raise CorruptSegmentError(path, problem)
        return table

    # -- reading ------------------------------------------------------------------------
    def read(
        self,
        after: Mapping[str, int] | None = None,
        upto: Mapping[str, int] | None = None,
        start_ts: int | None = None,
        end_ts: int | None = None,
        columns: list[str] | None = None,
    ) -> pa.Table:
        """Events with offsets in [after, upto) per partition and ts in [start_ts, end_ts).

        ``after``/``upto`` are watermarks ("topic:partition" -> offset); a partition missing from
        ``after`` starts at 0; ``upto`` is a snapshot, so a partition it does not name contributes
        nothing (pass ``upto=None`` for no upper bound). Rows come sorted by
        (ts, partition, offset), so training sees each user's events in time order. A segment
        that fails verification is quarantined and contributes no rows.
        """
        after_tp = {parse_tp(k): v for k, v in (after or {}).items()}
        upto_tp = {parse_tp(k): v for k, v in upto.items()} if upto is not None else None
        parts: list[pa.Table] = []
        for seg in self.segments():
            if not _overlaps(seg, after_tp, upto_tp, start_ts, end_ts):
                continue
            try:
                t = self._load(seg)
            except FileNotFoundError:  # compacted away while we read: retry on a fresh index
                return self.read(after, upto, start_ts, end_ts, columns)
            except CorruptSegmentError:
                continue  # quarantined and logged; ingest re-reads its offsets
            t = _filter(t, after_tp, upto_tp, start_ts, end_ts)
            if t.num_rows:
                parts.append(t.replace_schema_metadata(None))
        if not parts:
            out = ARROW_SCHEMA.empty_table()
        else:
            out = pa.concat_tables(parts).sort_by(
                [("ts", "ascending"), ("partition", "ascending"), ("offset", "ascending")]
            )
        return out.select(columns) if columns else out

    # -- maintenance --------------------------------------------------------------------
    @contextmanager
    def _maintenance_lock(self) -> Iterator[None]:
        # One compactor/retention pass at a time across processes; ingest never takes it.
        with (self.root / ".maintenance.lock").open("w") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def compact(self) -> int:
        """Merge runs of small segments; returns how many segments were replaced."""
        replaced = 0
        with self._maintenance_lock():
            self._finish_interrupted()
            small = [s for s in self.segments() if s.rows < self.cfg.compact_below_rows]
            group: list[Segment] = []
            for seg in [*small, None]:
                if seg is not None and sum(s.rows for s in group) + seg.rows <= (
                    self.cfg.compact_target_rows
                ):
                    group.append(seg)
                    continue
                if len(group) > 1:
                    self._merge(group)
                    replaced += len(group)
                group = [seg] if seg is not None else []
        return replaced

    def _merge(self, group: list[Segment]) -> None:
        try:
            tables = [self._load(s).replace_schema_metadata(None) for s in group]
        except CorruptSegmentError as err:  # quarantined; the rest is merged on the next pass
            log.warning("compaction skipped a group: %s", err)
            return
        merged = pa.concat_tables(tables)
        ranges = _coalesce([r for s in group for r in s.ranges])
        self._write(merged, ranges, replaces=tuple(s.name for s in group))
        self._delete([s.name for s in group])

    def _finish_interrupted(self) -> None:
        """Delete segments that a merged segment already replaces (a crash mid-compaction)."""
        live = {s.name for s in self.segments()}
        on_disk = {p.name for p in self.root.glob("seg-*.parquet")}
        self._delete(sorted(on_disk - live))
        for tmp in self.root.glob(".tmp-*"):
            if time.time() - tmp.stat().st_mtime > 3600:  # an abandoned write, not one under way
                tmp.unlink(missing_ok=True)

    def apply_retention(self, now_ms: int | None = None) -> int:
        """Delete segments whose newest event is older than the retention; returns how many."""
        if self.cfg.retention_hours is None:
            return 0
        now_ms = now_ms if now_ms is not None else int(time.time() * 1000)
        cutoff = now_ms - int(self.cfg.retention_hours * 3_600_000)
        with self._maintenance_lock():
            old = [s for s in self.segments() if s.max_ts is not None and s.max_ts < cutoff]
            if not old:
                return 0
            retired = self._retired_offsets()
            for seg in old:
                for r in seg.ranges:
                    key = tp_key(r.topic, r.partition)
                    retired[key] = max(retired.get(key, 0), r.end)
            # Record resume positions before deleting, so a crash in between cannot rewind ingest.
            atomic_write_bytes(self.root / "offsets.json", json.dumps(retired).encode())
            self._delete([s.name for s in old])
            return len(old)

    def _retired_offsets(self) -> dict[str, int]:
        try:
            data: dict[str, int] = json.loads((self.root / "offsets.json").read_text())
            return data
        except FileNotFoundError:
            return {}

    def _delete(self, names: list[str]) -> None:
        for name in names:
            (self.root / name).unlink(missing_ok=True)
            self._cache.pop(name, None)
        if names:
            fsync_dir(self.root)


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


def _salvage_ranges(path: Path) -> list[tuple[str, int, int, int]]:
    """Best effort: the offset ranges of a segment whose footer no longer parses."""
    try:
        raw = path.read_bytes()
    except OSError:
        return []
    m = re.search(rb'"ranges":(\[\[.*?\]\])', raw)
    if m is None:
        return []
    try:
        ranges = json.loads(m.group(1))
        return [(str(t), int(p), int(s), int(e)) for t, p, s, e in ranges if int(e) > int(s) >= 0]
    except (ValueError, TypeError):
        return []


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
