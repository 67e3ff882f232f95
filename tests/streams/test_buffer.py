"""The durable buffer without Kafka: atomic segments, watermarks, compaction and retention."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq

from streams.buffer import EventBuffer
from streams.config import BufferConfig
from streams.events import Event, EventType, RowBatch
from streams.offsets import OffsetRange
from streams.segments import BufferCommit, encode


def batch(topic: str, partition: int, offsets: range, ts0: int = 0) -> RowBatch:
    rows = RowBatch()
    for o in offsets:
        e = Event(
            event_id=f"{topic}-{partition}-{o}",
            user_id=f"u{o % 7}",
            item_id=f"i{o % 11}",
            event_type=EventType.VIEW,
            ts=ts0 + o,
        )
        rows.append(e, topic, partition, o)
    return rows


def add(buf: EventBuffer, partition: int, offsets: range, ts0: int = 0) -> None:
    buf.append(
        batch("t", partition, offsets, ts0).to_table(),
        [OffsetRange("t", partition, offsets.start, offsets.stop)],
    )


def make(tmp_path: Path, **kw: object) -> EventBuffer:
    return EventBuffer(BufferConfig(path=tmp_path / "buf", **kw))  # type: ignore[arg-type]


def test_watermark_and_read_between_watermarks(tmp_path: Path) -> None:
    buf = make(tmp_path)
    add(buf, 0, range(0, 10))
    add(buf, 1, range(0, 5))
    first = buf.watermark()
    assert first == {"t:0": 10, "t:1": 5}
    add(buf, 0, range(10, 15))
    add(buf, 2, range(0, 3))
    new = buf.read(after=first)
    assert sorted(new["event_id"].to_pylist()) == sorted(
        [f"t-0-{o}" for o in range(10, 15)] + [f"t-2-{o}" for o in range(3)]
    )
    # ``upto`` is a snapshot: partition 2 did not exist in it, so none of it is returned.
    old = buf.read(upto=first)
    assert old.num_rows == 15 and set(old["partition"].to_pylist()) == {0, 1}
    # A fresh instance (a restart) derives the same truth from the segment footers alone.
    assert EventBuffer(buf.cfg).watermark() == {"t:0": 15, "t:1": 5, "t:2": 3}


def test_read_is_time_ordered_and_ts_filtered(tmp_path: Path) -> None:
    buf = make(tmp_path)
    add(buf, 0, range(0, 10), ts0=100)
    add(buf, 1, range(0, 10), ts0=95)
    t = buf.read(start_ts=100, end_ts=105)
    ts = t["ts"].to_pylist()
    assert ts == sorted(ts) and min(ts) >= 100 and max(ts) < 105
    assert t.num_rows == 10  # 100..104 from both partitions


def test_empty_segment_records_coverage(tmp_path: Path) -> None:
    buf = make(tmp_path)
    # All records of a batch were dead-lettered: no rows, but the offsets are consumed.
    buf.append(RowBatch().to_table(), [OffsetRange("t", 0, 0, 7)])
    assert buf.next_offsets() == {("t", 0): 7}
    assert buf.read().num_rows == 0


def test_temp_files_are_invisible(tmp_path: Path) -> None:
    buf = make(tmp_path)
    add(buf, 0, range(0, 4))
    # A writer killed before its rename leaves a temp file that must never be read.
    (buf.root / ".tmp-seg-00000000000000000001-dead.parquet").write_bytes(b"partial")
    assert buf.read().num_rows == 4
    assert buf.watermark() == {"t:0": 4}


def test_compaction_merges_without_changing_content(tmp_path: Path) -> None:
    buf = make(tmp_path, compact_below_rows=100, compact_target_rows=25)
    for start in range(0, 60, 5):
        add(buf, start % 2, range(start, start + 5))
    before = buf.read()
    wm = buf.watermark()
    replaced = buf.compact()
    assert replaced == 12
    segs = buf.segments()
    assert len(segs) < 12 and all(s.rows <= 25 for s in segs)
    assert buf.read().equals(before)
    assert buf.watermark() == wm


def test_crash_mid_compaction_never_duplicates(tmp_path: Path) -> None:
    buf = make(tmp_path, compact_below_rows=100, compact_target_rows=1000)
    add(buf, 0, range(0, 5))
    add(buf, 0, range(5, 10))
    names = [s.name for s in buf.segments()]
    merged = buf.read()
    # Crash 1: the merged segment was uploaded but its log entry never written: invisible.
    rec = buf.store.stage(encode(merged, (OffsetRange("t", 0, 0, 10),), tuple(names), "compactor"))
    fresh = EventBuffer(buf.cfg)
    assert [s.name for s in fresh.segments()] == names and fresh.read().num_rows == 10
    # Crash 2: the entry "add merged, remove inputs" was committed, the inputs not yet deleted.
    buf.log.append(lambda st: BufferCommit(add=[rec], remove=names, writer="compactor"))
    assert all((buf.root / n).exists() for n in names)
    fresh = EventBuffer(buf.cfg)
    assert [s.name for s in fresh.segments()] == [rec.name]
    assert fresh.read().num_rows == 10  # the inputs are superseded, not read twice
    fresh.compact()  # and the next maintenance pass removes them
    assert not any((buf.root / n).exists() for n in names)
    assert fresh.read().num_rows == 10


def test_retention_keeps_resume_positions(tmp_path: Path) -> None:
    hour = 3_600_000
    buf = make(tmp_path, retention_hours=1.0)
    add(buf, 0, range(0, 5), ts0=0)
    add(buf, 0, range(5, 10), ts0=10 * hour)
    dropped = buf.apply_retention(now_ms=10 * hour + 10)
    assert dropped == 1
    assert buf.read().num_rows == 5
    assert buf.next_offsets() == {("t", 0): 10}
    # Even with every segment gone, ingest must resume after what was retired.
    buf.apply_retention(now_ms=100 * hour)
    assert buf.read().num_rows == 0
    assert EventBuffer(buf.cfg).next_offsets() == {("t", 0): 10}


def test_segments_are_self_describing_parquet(tmp_path: Path) -> None:
    buf = make(tmp_path)
    add(buf, 0, range(0, 3))
    (seg,) = buf.segments()
    table = pq.read_table(buf.root / seg.name)
    assert table.num_rows == 3 and b"streamtune" in (table.schema.metadata or {})
