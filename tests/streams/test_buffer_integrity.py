"""Buffer integrity without Kafka: the stale-writer fence, corrupt segments, a full disk."""

from __future__ import annotations

import errno
import os
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from streams.buffer import EventBuffer
from streams.config import BufferConfig
from streams.errors import CorruptSegmentError, DiskFullError, FencedError, StreamsError
from streams.offsets import OffsetRange
from streams.segments import SegmentFooter
from tests.streams.test_buffer import add, batch, make


def test_a_batch_the_buffer_already_holds_is_refused(tmp_path: Path) -> None:
    buf = make(tmp_path)
    add(buf, 0, range(0, 10))
    # A stale member re-delivers offsets another member already wrote: nothing may land twice.
    with pytest.raises(FencedError, match="already holds"):
        add(buf, 0, range(0, 10))
    with pytest.raises(FencedError):
        add(buf, 0, range(3, 7))
    assert buf.read().num_rows == 10 and len(buf.segments()) == 1


def test_an_overlapping_batch_is_trimmed_to_what_is_new(tmp_path: Path) -> None:
    buf = make(tmp_path)
    add(buf, 0, range(0, 10))
    seg = buf.append(batch("t", 0, range(5, 15)).to_table(), [OffsetRange("t", 0, 5, 15)])
    assert seg.fenced == 5 and seg.rows == 5
    assert [(r.start, r.end) for r in seg.ranges] == [(10, 15)]
    offsets = sorted(buf.read()["offset"].to_pylist())
    assert offsets == list(range(15))
    assert buf.next_offsets() == {("t", 0): 15}


def _flip(path: Path, at: float) -> None:
    data = bytearray(path.read_bytes())
    i = int(len(data) * at)
    data[i] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("where", [0.3, 0.97])  # in a data page; in the footer
def test_flipped_bytes_are_quarantined_never_read(tmp_path: Path, where: float) -> None:
    buf = make(tmp_path)
    add(buf, 0, range(0, 10))
    add(buf, 0, range(10, 20))
    add(buf, 1, range(0, 5))
    victim = buf.segments()[1]
    _flip(buf.root / victim.name, where)
    fresh = EventBuffer(buf.cfg)  # a reader that has not cached the footer yet
    table = fresh.read()
    # The corrupt segment's rows are not returned; every other row is.
    assert sorted(
        zip(table["partition"].to_pylist(), table["offset"].to_pylist(), strict=True)
    ) == [
        *[(0, o) for o in range(10)],
        *[(1, o) for o in range(5)],
    ]
    (rec,) = fresh.quarantined()
    assert rec.name == victim.name and rec.ranges == [("t", 0, 10, 20)]
    assert (buf.root / "quarantine" / victim.name).exists()
    assert not (buf.root / victim.name).exists()
    assert fresh.stats().quarantined == 1
    # Resume goes back to the hole so ingest re-reads it from Kafka...
    assert fresh.next_offsets() == {("t", 0): 10, ("t", 1): 5}
    # ...and the re-read fills it exactly once, then resume moves on.
    fresh.append(batch("t", 0, range(10, 20)).to_table(), [OffsetRange("t", 0, 10, 20)])
    assert fresh.next_offsets() == {("t", 0): 20, ("t", 1): 5}
    assert sorted(fresh.read()["event_id"].to_pylist()) == sorted(
        [f"t-0-{o}" for o in range(20)] + [f"t-1-{o}" for o in range(5)]
    )


def test_a_hole_in_the_middle_is_refilled_without_duplicating_later_offsets(
    tmp_path: Path,
) -> None:
    buf = make(tmp_path)
    for start in (0, 10, 20):
        add(buf, 0, range(start, start + 10))
    _flip(buf.root / buf.segments()[1].name, 0.3)
    buf.read()
    assert buf.next_offsets() == {("t", 0): 10}
    # Ingest re-reads from 10 to the end; what is still held (20..30) is dropped.
    seg = buf.append(batch("t", 0, range(10, 35)).to_table(), [OffsetRange("t", 0, 10, 35)])
    assert seg.fenced == 10
    offsets = sorted(buf.read()["offset"].to_pylist())
    assert offsets == list(range(35))


def test_corrupt_read_raises_typed_error(tmp_path: Path) -> None:
    buf = make(tmp_path)
    add(buf, 0, range(0, 10))
    seg = buf.segments()[0]
    _flip(buf.root / seg.name, 0.3)
    with pytest.raises(CorruptSegmentError, match="CRC") as info:
        buf.store.load(seg)
    assert isinstance(info.value, StreamsError)


def test_footers_are_typed() -> None:
    with pytest.raises(ValueError):
        SegmentFooter(ranges=[("t", 0, 5, 5)], rows=0)
    with pytest.raises(ValueError):
        SegmentFooter(ranges=[], rows=0)


def fill(path: Path) -> None:
    """Take every byte left on ``path``'s file system (proves ENOSPC really happens)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        for chunk in (65536, 4096, 1):
            while True:
                try:
                    os.write(fd, b"\0" * chunk)
                except OSError as err:
                    assert err.errno == errno.ENOSPC
                    break
    finally:
        os.close(fd)


@pytest.fixture
def tiny_fs(tmp_path: Path) -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mnt = tmp_path / f"tmpfs-{uuid.uuid4().hex[:6]}"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_disk_full_leaves_nothing_visible_and_names_the_path(tiny_fs: Path) -> None:
    buf = EventBuffer(BufferConfig(path=tiny_fs / "buf"))
    add(buf, 0, range(0, 50))
    filler = tiny_fs / "filler"
    fill(filler)
    with pytest.raises(DiskFullError, match="disk full") as info:
        add(buf, 0, range(50, 5000))
    assert str(buf.root) in str(info.value)
    assert not list(buf.root.glob(".tmp-*")), "a partial segment was left behind"
    assert len(buf.segments()) == 1 and buf.next_offsets() == {("t", 0): 50}
    filler.unlink()
    add(buf, 0, range(50, 5000))  # space is back: the same write succeeds
    assert sorted(buf.read()["offset"].to_pylist()) == list(range(5000))


def test_a_reader_opening_a_new_buffer_mid_append_never_loses_the_segment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The trainer or a stats call may open the buffer while ingest writes its very first
    segment: the reader finds an empty log and one segment object, and adopts it as a legacy
    buffer's. The writer's own commit then loses the race for entry 0; its segment is live all
    the same and must stay where the log says it is."""
    writer = make(tmp_path)
    real_append = writer.log.append
    readers: list[EventBuffer] = []

    def opened_meanwhile(make_entry: object) -> object:
        if not readers:
            readers.append(EventBuffer(writer.cfg))  # between the stage and the commit
        return real_append(make_entry)  # type: ignore[arg-type]

    monkeypatch.setattr(writer.log, "append", opened_meanwhile)
    add(writer, 0, range(0, 10))
    assert readers and len(readers[0].segments()) == 1  # the reader adopted the staged object
    assert readers[0].log.refresh().segments[readers[0].segments()[0].name]  # by its own entry
    monkeypatch.undo()
    fresh = EventBuffer(writer.cfg)
    assert sorted(fresh.read()["offset"].to_pylist()) == list(range(10))
    assert all((fresh.root / s.name).exists() for s in fresh.segments())
    add(writer, 0, range(10, 20))
    assert sorted(fresh.read()["offset"].to_pylist()) == list(range(20))


def test_a_segment_whose_object_vanished_is_a_hole_not_a_hang(tmp_path: Path) -> None:
    """A live segment whose object is gone (deleted by hand, lost by the store) is recorded as a
    hole that ingest refills, as a corrupt one is; reads go on with the rest."""
    buf = make(tmp_path)
    for start in (0, 10, 20):
        add(buf, 0, range(start, start + 10))
    (buf.root / buf.segments()[1].name).unlink()
    offsets = sorted(buf.read()["offset"].to_pylist())
    assert offsets == list(range(10)) + list(range(20, 30))
    assert buf.next_offsets() == {("t", 0): 10}
    assert len(buf.segments()) == 2
