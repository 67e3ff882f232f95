"""Faults of the stream layer: broker killed, disk full, corrupt segment, stalled member.

Each ``fault_*(tmp, quick)`` starts its own Kafka broker on free ports and its own buffer under
``tmp``, injects the fault from outside the product (SIGKILL of the broker JVM, a full tmpfs,
flipped bytes on disk, SIGSTOP/SIGCONT of an ingest process), and returns one row of the fault
table: survived, lost, duplicated (by event id and by Kafka offset), failed_requests (always 0:
no HTTP here), recover_s, detail, plus the evidence that the fault really happened.

    python -m bench.faults --only "broker killed" "disk full" "corrupt segment" "stalled member"
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from harness.faults_streams_kit import (
    TOPICS,
    Member,
    audit,
    broker_in,
    caught_up,
    events,
    member_main,
    row,
    spawn_member,
    wait_for,
)
from streams.buffer import EventBuffer
from streams.config import BufferConfig
from streams.producer import replay


# -- broker killed ---------------------------------------------------------------------------
def fault_broker_kill(tmp: Path, quick: bool) -> dict[str, Any]:
    """SIGKILL of the broker JVM mid-ingest, restart on the same ports and state: ingest resumes."""
    n = 20_000 if quick else 60_000
    outage_s = 3.0 if quick else 10.0
    evs = events(n, seed=21)
    with broker_in(tmp) as (broker, kafka):
        replay(evs[: n // 2], kafka, TOPICS.events)
        buf = EventBuffer(BufferConfig(path=tmp / "buf"))
        member = Member(kafka, buf, max_poll_records=100, segment_rows=100)
        wait_for(lambda: buf.stats().rows > 500, 60, "ingest to start writing")
        pid = broker.pid()
        if pid is None:
            raise RuntimeError("the broker has no pid to kill")
        rows_at_kill = buf.stats().rows
        os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)  # the JVM is our child: reap it, or it lingers as a zombie
        pid_gone = not _alive(pid)
        time.sleep(outage_s)
        rows_in_outage = buf.stats().rows
        broker.up()
        back = time.monotonic()
        new_pid = broker.pid()
        replay(evs[n // 2 :], kafka, TOPICS.events)
        wait_for(caught_up(buf, n), 240, "ingest to catch up after the restart")
        member.stop()
        first = member.first_flush_after(back)
        result = audit(buf, kafka, evs)
    ok = pid_gone and member.error is None and rows_at_kill < n // 2 and first is not None
    return row(
        "broker killed", ok, result, (first or back) - back,
        f"broker pid {pid} SIGKILLed at {rows_at_kill}/{n} rows, down {outage_s:.0f}s "
        f"(ingest held {rows_in_outage} rows meanwhile), restarted as pid {new_pid}; "
        f"ingest error: {member.error!r}",
        killed_pid=pid, pid_gone=pid_gone, restarted_pid=new_pid, rows_at_kill=rows_at_kill,
    )  # fmt: skip


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


# -- disk full -------------------------------------------------------------------------------
@contextlib.contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    """A small tmpfs mounted at ``path`` (needs root), unmounted on the way out."""
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        if subprocess.run(["umount", str(path)], check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(path)], check=False)


def fill(path: Path) -> int:
    """Take every byte left on ``path``'s file system; returns how many (ENOSPC proves it)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    written = 0
    try:
        for chunk in (1 << 16, 1 << 12, 1):
            while True:
                try:
                    written += os.write(fd, b"\0" * chunk)
                except OSError as err:
                    if err.errno != errno.ENOSPC:
                        raise
                    break
    finally:
        os.close(fd)
    return written


def fault_disk_full(tmp: Path, quick: bool) -> dict[str, Any]:
    """The buffer's disk fills while segments are written; ingest reports it and resumes."""
    if os.geteuid() != 0:
        raise PermissionError("the disk-full fault mounts a tmpfs and needs root")
    n = 12_000 if quick else 40_000
    evs = events(n, seed=22)
    with broker_in(tmp) as (_, kafka), tmpfs(tmp / "disk", "8m") as disk:
        replay(evs[: n // 3], kafka, TOPICS.events)
        buf = EventBuffer(BufferConfig(path=disk / "buf"))
        member = Member(kafka, buf)
        wait_for(lambda: buf.stats().rows > 0, 60, "ingest to start writing")
        filler = disk / "filler"
        filled = fill(filler)
        producer = threading.Thread(target=replay, args=(evs[n // 3 :], kafka, TOPICS.events))
        producer.start()
        wait_for(lambda: member.stats.disk_full >= 3, 60, "ingest to hit the full disk")
        # While full: no partial segment is visible, every visible one verifies, ingest lives.
        temp_files = sorted(p.name for p in buf.root.glob(".tmp-*"))
        rows_full = EventBuffer(buf.cfg).read().num_rows
        intact = EventBuffer(buf.cfg).quarantine_count() == 0
        error = member.stats.last_error
        alive_while_full = member.thread.is_alive()
        filler.unlink()
        freed = time.monotonic()
        producer.join()
        wait_for(caught_up(buf, n), 180, "ingest to resume after space returned")
        member.stop()
        first = member.first_flush_after(freed)
        result = audit(buf, kafka, evs)
        full_errors = member.stats.disk_full
    clear = "disk full" in error and str(buf.root) in error
    ok = (not temp_files and intact and clear and alive_while_full and member.error is None
          and first is not None)  # fmt: skip
    return row(
        "disk full", ok, result, (first or freed) - freed,
        f"filled {filled} bytes; {full_errors} failed flushes; visible while full: {rows_full} "
        f"rows, temp files {temp_files}; error: {error[:160]}",
        disk_full_errors=full_errors, temp_files_left=len(temp_files), error=error,
    )  # fmt: skip


# -- corrupt segment -------------------------------------------------------------------------
def flip(path: Path, at: float, count: int = 8) -> None:
    data = bytearray(path.read_bytes())
    start = int(len(data) * at)
    for i in range(start, min(len(data), start + count)):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def fault_corrupt_segment(tmp: Path, quick: bool) -> dict[str, Any]:
    """Bytes flipped in a segment: detected on read, quarantined, never returned, re-ingested."""
    n = 6_000 if quick else 30_000
    evs = events(n, seed=23)
    with broker_in(tmp) as (_, kafka):
        replay(evs[: n // 2], kafka, TOPICS.events)
        buf = EventBuffer(BufferConfig(path=tmp / "buf"))
        member = Member(kafka, buf, segment_rows=500)
        wait_for(caught_up(buf, n // 2), 120, "the first half to land")
        segs = [s for s in buf.segments() if s.rows]
        victim = segs[len(segs) // 2]
        flip(buf.root / victim.name, 0.3)
        reader = EventBuffer(buf.cfg)  # a trainer's fresh view of the buffer
        t0 = time.monotonic()
        seen = reader.read(columns=["partition", "offset"])
        served = set(zip(seen["partition"].to_pylist(), seen["offset"].to_pylist(), strict=True))
        victim_pos = {(r.partition, o) for r in victim.ranges for o in range(r.start, r.end)}
        leaked = len(served & victim_pos)
        records = reader.quarantined()
        quarantined = [r.name for r in records]
        moved = (buf.root / "quarantine" / victim.name).exists()
        # New events arrive; the running member notices the quarantine and re-reads the hole.
        replay(evs[n // 2 :], kafka, TOPICS.events)
        wait_for(lambda: EventBuffer(buf.cfg).read().num_rows >= n, 180, "the hole to refill")
        recover_s = time.monotonic() - t0
        member.stop()
        result = audit(buf, kafka, evs)
        stats = member.stats
    ok = (quarantined == [victim.name] and moved and leaked == 0
          and len(served) == n // 2 - victim.rows and member.error is None)  # fmt: skip
    return row(
        "corrupt segment", ok, result, recover_s,
        f"flipped 8 bytes of {victim.name} ({victim.rows} rows); reader got {len(served)} rows, "
        f"{leaked} of them from it; quarantined {quarantined}; ingest rewound {stats.rewinds}x, "
        f"dropped {stats.fenced} re-read offsets already held",
        quarantined=quarantined, rows_withheld=victim.rows, leaked_rows=leaked,
    )  # fmt: skip


# -- stalled member --------------------------------------------------------------------------
def fault_stalled_member(tmp: Path, quick: bool) -> dict[str, Any]:
    """SIGSTOP an ingest process past its session while another takes over, then SIGCONT it."""
    n = 10_000 if quick else 30_000
    rate = 700.0 if quick else 1_500.0
    session_ms = 6000
    evs = events(n, seed=24)
    with broker_in(tmp) as (_, kafka):
        buf = EventBuffer(BufferConfig(path=tmp / "buf"))
        common = {"session_timeout_ms": session_ms, "idle_exit_s": 8.0}
        producer = threading.Thread(
            target=replay, args=(evs, kafka, TOPICS.events), kwargs={"rate": rate}
        )
        producer.start()
        # A flushes rarely, so it always holds a batch in memory when it is stopped.
        a = spawn_member(tmp, "a", kafka, buf, flush_interval_s=4.0, segment_rows=1_000_000,
                         **common)  # fmt: skip
        writer_a = f"{socket.gethostname()}:{a.pid}"
        wait_for(lambda: any(s.writer == writer_a for s in buf.segments()), 60, "A's first flush")
        last_a = max(s.name for s in buf.segments() if s.writer == writer_a)
        time.sleep(2.0)
        os.kill(a.pid, signal.SIGSTOP)
        b = spawn_member(tmp, "b", kafka, buf, flush_interval_s=0.2, segment_rows=400, **common)
        writer_b = f"{socket.gethostname()}:{b.pid}"
        took_over = wait_for(
            lambda: any(s.writer == writer_b for s in buf.segments()), 60, "B to take over"
        )
        # Past A's session (and then some), so B has written everything A was holding.
        time.sleep(max(0.0, 2 * session_ms / 1000 + 2 - took_over))
        a_wrote_while_stopped = max(s.name for s in buf.segments() if s.writer == writer_a)
        os.kill(a.pid, signal.SIGCONT)
        producer.join()
        codes = (a.wait(timeout=180), b.wait(timeout=180))
        stats_a = json.loads((tmp / "member-a.json").read_text())
        result = audit(buf, kafka, evs)
    refused = stats_a["fenced"]
    ok = codes == (0, 0) and refused > 0 and a_wrote_while_stopped == last_a
    return row(
        "stalled member", ok, result, took_over,
        f"A (pid {a.pid}) stopped {2 * session_ms / 1000 + 2:.0f}s with its batch pending, B "
        f"took over in {took_over:.1f}s; on SIGCONT A's stale records refused: {refused} "
        f"({stats_a['last_error'][:120]}); exit codes {codes}",
        stalled_refused=refused, exit_codes=list(codes),
    )  # fmt: skip


FAULTS = {
    "broker killed": fault_broker_kill,
    "disk full": fault_disk_full,
    "corrupt segment": fault_corrupt_segment,
    "stalled member": fault_stalled_member,
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--member", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--only", nargs="*", choices=list(FAULTS))
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if args.member:
        member_main(args.member)
        return
    import tempfile

    for name in args.only or list(FAULTS):
        with tempfile.TemporaryDirectory(prefix="fault-") as tmp:
            print(json.dumps(FAULTS[name](Path(tmp), args.quick), default=str), flush=True)


if __name__ == "__main__":
    main()
