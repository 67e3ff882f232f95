"""The durable event buffer: immutable Parquet segments that record which Kafka offsets they cover.

Every segment carries, in its Parquet footer, the (topic, partition, [start, end)) offset ranges it
covers, so the buffer itself, not Kafka's committed offsets, is the source of truth for what was
ingested: on restart a consumer resumes from ``next_offsets()``. A segment becomes visible only by
an atomic rename after its bytes are fsynced, so a crash at any point leaves either the whole
segment or none of it.

Compaction merges small segments into one whose footer names the segments it replaces; readers
ignore replaced segments even if a crash left them behind, so compaction never duplicates rows.
Retention deletes old segments but first folds their offsets into ``offsets.json`` so resume
positions survive the deletion.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from streams.config import BufferConfig
from streams.events import ARROW_SCHEMA

TopicPartition = tuple[str, int]
Watermark = dict[str, int]  # "topic:partition" -> next offset not yet included

_META_KEY = b"streamtune"


def tp_key(topic: str, partition: int) -> str:
    return f"{topic}:{partition}"


def parse_tp(key: str) -> TopicPartition:
    topic, _, partition = key.rpartition(":")
    if not topic or not partition.isdigit():
        raise ValueError(f"watermark key {key!r} is not 'topic:partition'")
    return topic, int(partition)


@dataclass(frozen=True)
class OffsetRange:
    topic: str
    partition: int
    start: int  # first offset covered
    end: int  # one past the last offset covered

    def __post_init__(self) -> None:
        assert self.end > self.start >= 0, self


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


@dataclass
class BufferStats:
    segments: int = 0
    rows: int = 0
    bytes: int = 0
    partitions: dict[str, int] = field(default_factory=dict)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write, fsync, rename, fsync the directory: readers see the old or the new file, whole."""
    tmp = path.with_name(f".tmp-{path.name}-{uuid.uuid4().hex[:8]}")
    with tmp.open("wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


class EventBuffer:
    """A directory of Parquet segments shared by any number of ingest processes and readers."""

    def __init__(self, cfg: BufferConfig) -> None:
        self.cfg = cfg
        self.root = cfg.path
        self.root.mkdir(parents=True, exist_ok=True)
        self._cache: dict[str, Segment] = {}

    # -- writing ------------------------------------------------------------------------
    def append(self, table: pa.Table, ranges: list[OffsetRange], writer: str = "") -> Segment:
        """Durably add one segment covering ``ranges`` (it may hold no rows: all dead-lettered)."""
        if not ranges:
            raise ValueError("a segment must cover at least one offset range")
        return self._write(table.cast(ARROW_SCHEMA), tuple(ranges), replaces=(), writer=writer)

    def _write(
        self,
        table: pa.Table,
        ranges: tuple[OffsetRange, ...],
        replaces: tuple[str, ...],
        writer: str = "compactor",
    ) -> Segment:
        name = f"seg-{time.time_ns():020d}-{uuid.uuid4().hex[:8]}.parquet"
        ts = table.column("ts")
        meta = {
            "v": 1,
            "ranges": [[r.topic, r.partition, r.start, r.end] for r in ranges],
            "replaces": list(replaces),
            "writer": writer,
            "rows": table.num_rows,
            "min_ts": pc.min(ts).as_py() if table.num_rows else None,
            "max_ts": pc.max(ts).as_py() if table.num_rows else None,
        }
        table = table.replace_schema_metadata({_META_KEY: json.dumps(meta).encode()})
        final = self.root / name
        tmp = self.root / f".tmp-{name}"
        with tmp.open("wb") as fh:
            pq.write_table(table, fh, compression="zstd")
            fh.flush()
            os.fsync(fh.fileno())
        os.rename(tmp, final)
        fsync_dir(self.root)
        seg = _segment_from_meta(name, meta, final.stat().st_size)
        self._cache[name] = seg
        return seg

    # -- the index ----------------------------------------------------------------------
    def segments(self) -> list[Segment]:
        """Live segments in creation order (replaced ones, and temp files, are ignored)."""
        names = sorted(p.name for p in self.root.glob("seg-*.parquet"))
        segs = []
        for name in names:
            seg = self._cache.get(name)
            if seg is None:
                seg = self._read_meta(name)
                if seg is None:  # deleted under us by compaction or retention
                    continue
                self._cache[name] = seg
            segs.append(seg)
        replaced = {r for s in segs for r in s.replaces}
        return [s for s in segs if s.name not in replaced]

    def _read_meta(self, name: str) -> Segment | None:
        path = self.root / name
        try:
            md = pq.read_schema(path).metadata or {}
            size = path.stat().st_size
        except FileNotFoundError:
            return None
        return _segment_from_meta(name, json.loads(md[_META_KEY]), size)

    def next_offsets(self) -> dict[TopicPartition, int]:
        """Per partition, the first offset the buffer does not hold: where ingest resumes."""
        nxt: dict[TopicPartition, int] = {
            parse_tp(k): v for k, v in self._retired_offsets().items()
        }
        for seg in self.segments():
            for r in seg.ranges:
                tp = (r.topic, r.partition)
                nxt[tp] = max(nxt.get(tp, 0), r.end)
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
        )

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
        (ts, partition, offset), so training sees each user's events in time order.
        """
        after_tp = {parse_tp(k): v for k, v in (after or {}).items()}
        upto_tp = {parse_tp(k): v for k, v in upto.items()} if upto is not None else None
        parts: list[pa.Table] = []
        for seg in self.segments():
            if not _overlaps(seg, after_tp, upto_tp, start_ts, end_ts):
                continue
            try:
                t = pq.read_table(self.root / seg.name)
            except FileNotFoundError:  # compacted away while we read: retry on a fresh index
                return self.read(after, upto, start_ts, end_ts, columns)
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
        tables = [pq.read_table(self.root / s.name).replace_schema_metadata(None) for s in group]
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


def _segment_from_meta(name: str, meta: dict[str, object], size: int) -> Segment:
    ranges = tuple(OffsetRange(t, p, s, e) for t, p, s, e in meta["ranges"])  # type: ignore[attr-defined]
    return Segment(
        name=name,
        rows=int(meta["rows"]),  # type: ignore[call-overload]
        ranges=ranges,
        replaces=tuple(meta.get("replaces") or ()),  # type: ignore[arg-type]
        min_ts=meta.get("min_ts"),  # type: ignore[arg-type]
        max_ts=meta.get("max_ts"),  # type: ignore[arg-type]
        bytes=size,
        writer=str(meta.get("writer", "")),
    )


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
