"""Writing the buffer: one segment per append, fenced against offsets it already holds.

The slow part of an append (encode, upload, fsync) happens before the commit; only the coverage
check and the create-only log entry are retried when another writer commits first. That check
subtracts the offsets live segments already cover, so no offset is ever covered twice: a stale
member, paused past its session while another took its partitions, is fenced (``FencedError``
when nothing is left). A crash at any point leaves a segment either committed whole or an
unreferenced object that maintenance deletes later (``streams.compaction``).
"""

from __future__ import annotations

import contextlib
import json
import logging

import pyarrow as pa
import pyarrow.parquet as pq

from streams.errors import CorruptSegmentError, EventBufferError, FencedError
from streams.events import ARROW_SCHEMA
from streams.offsets import OffsetRange, count, describe, rows_in, subtract
from streams.segment_store import SegmentStore
from streams.segments import (
    BufferCommit,
    BufferState,
    Segment,
    SegmentRecord,
    coverage,
    encode,
    footer_of,
    segment_of,
    with_fenced,
)

log = logging.getLogger(__name__)


def append(
    store: SegmentStore, table: pa.Table, ranges: list[OffsetRange], writer: str = ""
) -> Segment:
    """Durably add one segment covering ``ranges`` (see ``EventBuffer.append``)."""
    if not ranges:
        raise EventBufferError("a segment must cover at least one offset range")
    table = table.cast(ARROW_SCHEMA)
    wanted = tuple(ranges)
    staged = store.stage(encode(table, wanted, (), writer))
    current: list[tuple[tuple[OffsetRange, ...], SegmentRecord]] = [(wanted, staged)]

    def decide(state: BufferState) -> BufferCommit | None:
        ranges_now, rec = current[0]
        if rec.name in state.segments:
            # A reader opening a buffer whose log was still empty adopted the staged object
            # as a legacy segment (``adopt_legacy``): it is committed; deleting it now would
            # leave the log naming a segment that is gone.
            return None
        kept = subtract(wanted, coverage(state))
        if kept != ranges_now:
            store.storage.delete(rec.name)
            if not kept:
                raise FencedError(
                    f"refused {count(wanted)} offsets from {writer or 'a writer'} "
                    f"({describe(wanted)}): the buffer already holds all of them"
                )
            rec = store.stage(encode(rows_in(table, kept), kept, (), writer))
            current[0] = (kept, rec)
        return BufferCommit(add=[rec], writer=writer)

    try:
        store.commit(decide)
    except BaseException:
        # Unless a log entry names it after all (adopted, or the failure came after the
        # entry was written): an orphan is collected later, a named object never comes back.
        with contextlib.suppress(Exception):
            if current[0][1].name not in store.log.refresh().segments:
                store.storage.delete(current[0][1].name)
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


def adopt_legacy(store: SegmentStore) -> None:
    """A buffer written before the commit log existed: commit its live segments once."""
    if store.log.refresh().segments or store.log.next_entry > 0:
        return
    names = [o.key for o in store.storage.list("seg-")]
    try:
        retired: dict[str, int] = json.loads(store.storage.read("offsets.json"))
    except FileNotFoundError:
        retired = {}
    if not names and not retired:
        return
    recs = []
    for name in names:
        try:
            data = store.storage.read(name)
            footer = footer_of(pq.read_schema(pa.BufferReader(data)))
        except (FileNotFoundError, pa.ArrowException, OSError, CorruptSegmentError):
            continue  # the next read of its offsets finds the hole; ingest refills it
        recs.append(SegmentRecord(name=name, bytes=len(data), footer=footer))
    replaced = {r for rec in recs for r in rec.footer.replaces}
    live = [r for r in recs if r.name not in replaced]
    store.log.append(
        lambda st: (
            None
            if st.segments or store.log.next_entry > 0
            else BufferCommit(add=live, retire=retired, writer="adopt")
        )
    )
    log.info("adopted %d segments of a buffer written before its commit log", len(live))
