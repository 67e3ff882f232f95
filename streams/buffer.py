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

The typed contracts (footer, log entries, state) are in ``streams.segments``; the offset-range
arithmetic of the fence is in ``streams.offsets``.
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

import pyarrow as pa
import pyarrow.parquet as pq

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
from streams.offsets import (
    OffsetRange,
    TopicPartition,
    Watermark,
    coalesce,
    count,
    describe,
    filter_rows,
    first_uncovered,
    parse_tp,
    rows_in,
    subtract,
    tp_key,
)
from streams.segments import (
    BufferCommit,
    BufferState,
    QuarantineRecord,
    Segment,
    SegmentRecord,
    apply_commit,
    coverage,
    crc_of,
    encode,
    footer_of,
    overlaps,
    segment_of,
    with_fenced,
)
from streams.storage import Storage, open_storage

log = logging.getLogger(__name__)

_NS_IN_NAME = re.compile(r"^seg-(\d{20})-")
QUARANTINE = "quarantine"
LOG = "_log"
ORPHAN_AFTER_S = 3600  # an uncommitted segment object older than this is abandoned, not in flight


@dataclass
class BufferStats:
    segments: int = 0
    rows: int = 0
    bytes: int = 0
    partitions: dict[str, int] = field(default_factory=dict)
    quarantined: int = 0


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
        self.log = CommitLog(self.storage, LOG, BufferState, BufferCommit, apply_commit)
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
        staged = self._stage(encode(table, wanted, (), writer))
        current: list[tuple[tuple[OffsetRange, ...], SegmentRecord]] = [(wanted, staged)]

        def decide(state: BufferState) -> BufferCommit | None:
            ranges_now, rec = current[0]
            if rec.name in state.segments:
                # A reader opening a buffer whose log was still empty adopted the staged object
                # as a legacy segment (``_adopt_legacy``): it is committed; deleting it now would
                # leave the log naming a segment that is gone.
                return None
            kept = subtract(wanted, coverage(state))
            if kept != ranges_now:
                self.storage.delete(rec.name)
                if not kept:
                    raise FencedError(
                        f"refused {count(wanted)} offsets from {writer or 'a writer'} "
                        f"({describe(wanted)}): the buffer already holds all of them"
                    )
                rec = self._stage(encode(rows_in(table, kept), kept, (), writer))
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
        seg = segment_of(rec)
        if kept != wanted:
            fenced = count(wanted) - count(kept)
            log.warning(
                "fenced %d offsets of %s already held by the buffer; wrote %s",
                fenced, writer or "a writer", describe(kept),
            )  # fmt: skip
            return with_fenced(seg, fenced)
        return seg

    def _stage(self, data: pa.Buffer) -> SegmentRecord:
        """Write a segment object that no reader sees until a log entry names it."""
        name = f"seg-{time.time_ns():020d}-{uuid.uuid4().hex[:8]}-c{zlib.crc32(data):08x}.parquet"
        try:
            self.storage.write(name, data.to_pybytes())
        except OSError as err:
            raise _write_error(f"{self.storage.uri}/{name}", err) from err
        footer = footer_of(pq.read_schema(pa.BufferReader(data)))
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
                footer = footer_of(pq.read_schema(pa.BufferReader(data)))
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
        return [segment_of(state.segments[n]) for n in sorted(state.segments)]

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
            covered = coverage(state)
            for q in state.quarantined:
                for topic, part, start, end in q.ranges:
                    hole = first_uncovered(covered.get((topic, part), []), start, end)
                    if hole is not None:
                        nxt[(topic, part)] = min(nxt.get((topic, part), hole), hole)
        return nxt

    def watermark(self) -> Watermark:
        return {tp_key(t, p): o for (t, p), o in sorted(self.next_offsets().items())}

    def stats(self) -> BufferStats:
        records = list(self.log.refresh().segments.values())  # (no Segment built per record)
        return BufferStats(
            segments=len(records),
            rows=sum(r.footer.rows for r in records),
            bytes=sum(r.bytes for r in records),
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
        expected = crc_of(seg.name)
        problem = None
        if expected is not None and zlib.crc32(data) != expected:
            problem = f"CRC-32 {zlib.crc32(data):08x} != {expected:08x} recorded in its name"
        else:
            try:
                table = pq.ParquetFile(pa.BufferReader(data)).read()  # 4x quicker than read_table
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
        return [s for s in self.segments() if overlaps(s, after_tp, upto_tp, start_ts, end_ts)]

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
            t = filter_rows(t, after_tp, upto_tp, start_ts, end_ts)
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
        ranges = coalesce([r for s in group for r in s.ranges])
        names = [s.name for s in group]
        rec = self._stage(encode(merged, ranges, tuple(names), "compactor"))
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
