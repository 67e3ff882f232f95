"""Buffer maintenance: merge small segments, apply retention, delete orphaned objects.

Compaction writes a merged segment and commits "add merged, remove its inputs" in one entry, so
readers see the inputs or the merged segment, never both. Retention commits the removal of old
segments together with their resume positions, so no crash can rewind ingest.
"""

from __future__ import annotations

import logging
import re
import time

import pyarrow as pa

from streams.config import BufferConfig
from streams.errors import CorruptSegmentError
from streams.offsets import coalesce, tp_key
from streams.segment_store import SegmentStore
from streams.segments import BufferCommit, BufferState, Segment, encode

log = logging.getLogger(__name__)

_NS_IN_NAME = re.compile(r"^seg-(\d{20})-")
ORPHAN_AFTER_S = 3600  # an uncommitted segment object older than this is abandoned, not in flight


def compact(store: SegmentStore, cfg: BufferConfig) -> int:
    """Merge runs of small segments; returns how many segments were replaced."""
    replaced = 0
    delete_orphans(store)
    small = [s for s in store.segments() if s.rows < cfg.compact_below_rows]
    group: list[Segment] = []
    for seg in [*small, None]:
        if seg is not None and sum(s.rows for s in group) + seg.rows <= cfg.compact_target_rows:
            group.append(seg)
            continue
        if len(group) > 1 and _merge(store, group):
            replaced += len(group)
        group = [seg] if seg is not None else []
    return replaced


def _merge(store: SegmentStore, group: list[Segment]) -> bool:
    try:
        tables = [store.load(s).replace_schema_metadata(None) for s in group]
    except (CorruptSegmentError, FileNotFoundError) as err:
        log.warning("compaction skipped a group: %s", err)  # merged on a later pass
        return False
    merged = pa.concat_tables(tables)
    ranges = coalesce([r for s in group for r in s.ranges])
    names = [s.name for s in group]
    rec = store.stage(encode(merged, ranges, tuple(names), "compactor"))
    done = store.commit(
        lambda st: (
            BufferCommit(add=[rec], remove=names, writer="compactor")
            if all(n in st.segments for n in names)
            else None
        )  # another compactor, retention or quarantine got there first
    )
    store.delete([s.name for s in group] if done else [rec.name])
    return done is not None


def delete_orphans(store: SegmentStore) -> None:
    """Delete segment objects no log entry names that are too old to be a commit in flight."""
    state = store.log.refresh()
    # Inputs of a committed compaction are dead at once; anything else only once it is too
    # old to be a segment whose commit is still in flight.
    replaced = {r for rec in state.segments.values() for r in rec.footer.replaces}
    cutoff = time.time_ns() - ORPHAN_AFTER_S * 1_000_000_000
    for obj in store.storage.list("seg-"):
        if obj.key in state.segments:
            continue
        m = _NS_IN_NAME.match(obj.key)
        if obj.key in replaced or (m is not None and int(m.group(1)) < cutoff):
            store.storage.delete(obj.key)


def apply_retention(store: SegmentStore, cfg: BufferConfig, now_ms: int | None = None) -> int:
    """Delete segments whose newest event is older than the retention; returns how many."""
    if cfg.retention_hours is None:
        return 0
    now_ms = now_ms if now_ms is not None else int(time.time() * 1000)
    cutoff = now_ms - int(cfg.retention_hours * 3_600_000)
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

    if store.commit(decide) is None:
        return 0
    store.delete(gone)
    return len(gone)
