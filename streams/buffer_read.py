"""Reading the buffer: plan the segments a range touches, load them verified, filter, sort."""

from __future__ import annotations

from collections.abc import Mapping

import pyarrow as pa

from streams.errors import CorruptSegmentError
from streams.events import ARROW_SCHEMA
from streams.offsets import TopicPartition, filter_rows, parse_tp
from streams.segment_store import SegmentStore
from streams.segments import Segment, overlaps


def plan(
    store: SegmentStore,
    after: Mapping[str, int] | None = None,
    upto: Mapping[str, int] | None = None,
    start_ts: int | None = None,
    end_ts: int | None = None,
) -> list[Segment]:
    """The live segments that hold rows in [after, upto) and [start_ts, end_ts)."""
    return _plan(store, *_parse(after, upto), start_ts, end_ts)


def _parse(
    after: Mapping[str, int] | None, upto: Mapping[str, int] | None
) -> tuple[dict[TopicPartition, int], dict[TopicPartition, int] | None]:
    """Watermarks ("topic:partition" -> offset) keyed by partition."""
    after_tp = {parse_tp(k): v for k, v in (after or {}).items()}
    upto_tp = {parse_tp(k): v for k, v in upto.items()} if upto is not None else None
    return after_tp, upto_tp


def _plan(
    store: SegmentStore, after_tp: dict[TopicPartition, int],
    upto_tp: dict[TopicPartition, int] | None, start_ts: int | None, end_ts: int | None,
) -> list[Segment]:  # fmt: skip
    return [s for s in store.segments() if overlaps(s, after_tp, upto_tp, start_ts, end_ts)]


def read(
    store: SegmentStore,
    after: Mapping[str, int] | None = None,
    upto: Mapping[str, int] | None = None,
    start_ts: int | None = None,
    end_ts: int | None = None,
    columns: list[str] | None = None,
    segments: list[Segment] | None = None,
) -> pa.Table:
    """Events with offsets in [after, upto) per partition and ts in [start_ts, end_ts), sorted
    by (ts, partition, offset) (see ``EventBuffer.read``)."""
    after_tp, upto_tp = _parse(after, upto)
    while True:
        planned = (
            segments if segments is not None else _plan(store, after_tp, upto_tp, start_ts, end_ts)
        )
        parts = _read_planned(store, planned, after_tp, upto_tp, start_ts, end_ts)
        if parts is not None:
            break
        if segments is not None:  # a caller's plan went stale (compaction): it must plan again
            raise FileNotFoundError(f"{store.storage.uri}: a planned segment is gone")
    if not parts:
        out = ARROW_SCHEMA.empty_table()
    else:
        out = pa.concat_tables(parts).sort_by(
            [("ts", "ascending"), ("partition", "ascending"), ("offset", "ascending")]
        )
    return out.select(columns) if columns else out


def _read_planned(
    store: SegmentStore, planned: list[Segment], after_tp: dict[TopicPartition, int],
    upto_tp: dict[TopicPartition, int] | None, start_ts: int | None, end_ts: int | None,
) -> list[pa.Table] | None:  # fmt: skip
    """The planned segments' rows in range; None when one is gone (plan again)."""
    parts: list[pa.Table] = []
    for seg in planned:
        try:
            t = store.load(seg)
        except FileNotFoundError:
            if seg.name in store.log.refresh().segments:
                # Still named by the log, yet gone: lost, not replaced. Recorded as a hole
                # like a corrupt segment, so ingest re-reads its offsets from Kafka.
                store.quarantine(seg, "object missing", None)
            return None
        except CorruptSegmentError:
            continue  # quarantined and logged; ingest re-reads its offsets
        t = filter_rows(t, after_tp, upto_tp, start_ts, end_ts)
        if t.num_rows:
            parts.append(t.replace_schema_metadata(None))
    return parts
