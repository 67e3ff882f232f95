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
arithmetic of the fence is in ``streams.offsets``. Segment objects and their log are
``streams.segment_store``'s; appending is ``streams.buffer_write``'s, reading
``streams.buffer_read``'s, compaction and retention ``streams.compaction``'s.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa

from streams import buffer_read, buffer_write, compaction
from streams.config import BufferConfig
from streams.errors import EventBufferError
from streams.offsets import (
    OffsetRange,
    TopicPartition,
    Watermark,
    first_uncovered,
    parse_tp,
    tp_key,
)
from streams.segment_store import SegmentStore
from streams.segments import QuarantineRecord, Segment, coverage
from streams.storage import open_storage


@dataclass
class BufferStats:
    segments: int = 0
    rows: int = 0
    bytes: int = 0
    partitions: dict[str, int] = field(default_factory=dict)
    quarantined: int = 0


class EventBuffer:
    """Parquet segments under a directory or object-store prefix, shared by any number of
    ingest processes and readers on any number of machines."""

    def __init__(self, cfg: BufferConfig) -> None:
        self.cfg = cfg
        self.store = SegmentStore(open_storage(cfg.path, cfg.storage))
        self.storage = self.store.storage
        self.log = self.store.log
        buffer_write.adopt_legacy(self.store)

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
        return buffer_write.append(self.store, table, ranges, writer)

    # -- the index ----------------------------------------------------------------------
    def segments(self) -> list[Segment]:
        """Live segments in creation order, as the commit log has them."""
        return self.store.segments()

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

    # -- reading ------------------------------------------------------------------------
    def plan(
        self,
        after: Mapping[str, int] | None = None,
        upto: Mapping[str, int] | None = None,
        start_ts: int | None = None,
        end_ts: int | None = None,
    ) -> list[Segment]:
        """The live segments that hold rows in [after, upto) and [start_ts, end_ts)."""
        return buffer_read.plan(self.store, after, upto, start_ts, end_ts)

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
        return buffer_read.read(self.store, after, upto, start_ts, end_ts, columns, segments)

    # -- maintenance --------------------------------------------------------------------
    def compact(self) -> int:
        """Merge runs of small segments; returns how many segments were replaced."""
        return compaction.compact(self.store, self.cfg)

    def apply_retention(self, now_ms: int | None = None) -> int:
        """Delete segments whose newest event is older than the retention; returns how many."""
        return compaction.apply_retention(self.store, self.cfg, now_ms)
