"""Segment objects and the commit log that makes them visible: stage, commit, verify, quarantine.

A segment object is written whole under a unique key and is invisible until an entry of the
buffer's commit log (``_log/``, ``streams.commitlog``) names it. A segment's name carries the
CRC-32 of its bytes; one whose bytes or row count fail verification on load is moved to
``quarantine/`` and a log entry records the offsets it covered, so its rows are never returned.
Everything the buffer does (``streams.buffer``) goes through these few steps.
"""

from __future__ import annotations

import errno
import logging
import time
import uuid
import zlib
from collections.abc import Callable

import pyarrow as pa
import pyarrow.parquet as pq

from streams.commitlog import CommitLog
from streams.errors import BufferWriteError, CorruptSegmentError, DiskFullError
from streams.segments import (
    BufferCommit,
    BufferState,
    QuarantineRecord,
    Segment,
    SegmentRecord,
    apply_commit,
    crc_of,
    footer_of,
    segment_of,
)
from streams.storage import Storage

log = logging.getLogger(__name__)

QUARANTINE = "quarantine"
LOG = "_log"


def write_error(where: str, err: OSError) -> BufferWriteError:
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        return DiskFullError(where, f"disk full ({err.strerror}); nothing of it is visible")
    return BufferWriteError(where, f"{err.strerror or err}; nothing of it is visible")


class SegmentStore:
    """The segment objects under ``storage`` and the commit log beside them."""

    def __init__(self, storage: Storage) -> None:
        self.storage = storage
        self.log = CommitLog(storage, LOG, BufferState, BufferCommit, apply_commit)

    def segments(self) -> list[Segment]:
        """Live segments in creation order, as the commit log has them."""
        state = self.log.refresh()
        return [segment_of(state.segments[n]) for n in sorted(state.segments)]

    def stage(self, data: pa.Buffer) -> SegmentRecord:
        """Write a segment object that no reader sees until a log entry names it."""
        name = f"seg-{time.time_ns():020d}-{uuid.uuid4().hex[:8]}-c{zlib.crc32(data):08x}.parquet"
        try:
            self.storage.write(name, data.to_pybytes())
        except OSError as err:
            raise write_error(f"{self.storage.uri}/{name}", err) from err
        footer = footer_of(pq.read_schema(pa.BufferReader(data)))
        return SegmentRecord(name=name, bytes=len(data), footer=footer)

    def commit(
        self, decide: Callable[[BufferState], BufferCommit | None]
    ) -> tuple[BufferCommit, int] | None:
        try:
            return self.log.append(decide)
        except OSError as err:
            raise write_error(f"{self.storage.uri}/{LOG}", err) from err

    def load(self, seg: Segment) -> pa.Table:
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
            self.quarantine(seg, problem, data)
            raise CorruptSegmentError(f"{self.storage.uri}/{seg.name}", problem)
        return table

    def quarantine(self, seg: Segment, reason: str, data: bytes | None) -> None:
        """Set a segment that failed verification aside, recording the offsets it covered."""
        ranges = [(r.topic, r.partition, r.start, r.end) for r in seg.ranges]
        record = QuarantineRecord(name=seg.name, reason=reason, ranges=ranges, at=time.time())
        # The log entry first: once the segment is gone, its offsets must already count as a hole.
        done = self.commit(
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

    def delete(self, names: list[str]) -> None:
        for name in names:
            self.storage.delete(name)
