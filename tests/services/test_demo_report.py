"""The demo's report: slices, per-event accounting from the loop's records, summary, table, plot."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
from rich.console import Console

from services.demo import Clock
from services.demo_report import (
    Fates,
    Row,
    account,
    fill_rows,
    ledger_of,
    places_of,
    plot,
    registered_at,
    slice_bounds,
    summary,
    table,
)
from streams.events import Event, EventType

TP = "t:0"


def _record(version: int, promoted: bool, **spans: Any) -> dict[str, Any]:
    return {"version": version, "promoted": promoted, **spans}


def _span(after: int, upto: int) -> dict[str, Any]:
    return {"after": {TP: after}, "upto": {TP: upto}, "events": upto - after}


def test_slice_bounds_cover_the_replay_after_the_backlog() -> None:
    assert slice_bounds(10, 40, 10) == [(10, 20), (20, 30), (30, 40)]
    assert slice_bounds(10, 44, 10) == [(10, 20), (20, 30), (30, 44)]  # a short tail joins
    assert slice_bounds(10, 36, 10) == [(10, 20), (20, 30), (30, 36)]  # half a slice stays
    assert slice_bounds(10, 13, 10) == [(10, 13)]
    assert slice_bounds(10, 10, 10) == []


def test_account_attributes_each_event_to_the_version_that_first_trained_it() -> None:
    records = [
        _record(1, True, trained=[_span(0, 4)]),
        _record(2, False, trained=[]),  # rejected: its events wait in the carry
        _record(3, True, trained=[_span(4, 6), _span(6, 8)]),  # carried 4-6, its own 6-8
        _record(4, False, trained=[], dropped=[_span(8, 9)]),
    ]
    ledger = ledger_of(records)
    places: list[tuple[str, int] | None] = [(TP, i) for i in range(10)] + [None]
    published = [100.0 + i for i in range(11)]
    first_seen = {1: 105.0, 3: 120.0}
    fates = account(ledger, places, published.__getitem__, first_seen, first=2)
    assert fates.fresh_s[:2] == [None, None]  # the backlog is not accounted
    assert fates.fresh_s[2:8] == [3.0, 2.0, 16.0, 15.0, 14.0, 13.0]
    assert fates.never_trained == [False] * 8 + [True, False, False]
    assert fates.pending == [False] * 9 + [True, True]  # 9: no round; 10: never buffered


def test_a_version_that_never_answered_counts_by_its_first_live_descendant() -> None:
    ledger = ledger_of(
        [_record(1, True, trained=[_span(0, 2)]), _record(2, True, trained=[_span(2, 4)])]
    )
    places: list[tuple[str, int] | None] = [(TP, i) for i in range(4)]
    fates = account(ledger, places, lambda i: 0.0, {2: 50.0}, first=0)
    assert fates.fresh_s == [50.0] * 4
    unserved = account(ledger, places, lambda i: 0.0, {}, first=0)
    assert unserved.fresh_s == [None] * 4 and not any(unserved.pending)


def test_ledger_of_falls_back_to_the_rounds_own_slice_without_spans() -> None:
    old = [
        {"version": 1, "promoted": True, "after_watermark": {}, "watermark": {TP: 5}},
        {"version": 2, "promoted": False, "after_watermark": {TP: 5}, "watermark": {TP: 8}},
        {"version": 3, "promoted": True, "after_watermark": {TP: 8}, "watermark": {TP: 9}},
    ]
    ledger = ledger_of(old)
    assert ledger.first_trained_by(TP, 0) == 1
    assert ledger.first_trained_by(TP, 6) is None
    assert ledger.first_trained_by(TP, 8) == 3
    assert ledger_of([_record(1, True, trained=[])]).first_trained_by(TP, 0) is None


def test_fill_rows_counts_rounds_registered_while_each_slice_was_published() -> None:
    rows = [Row(0, 3), Row(3, 6)]
    fates = Fates(
        fresh_s=[1.0, 3.0, None, 10.0, None, None],
        never_trained=[False, False, False, False, True, False],
        pending=[False, False, True, False, False, True],
    )
    registered = [(5.0, True, False), (9.0, False, False), (10.0, True, True),
                  (12.0, True, False), (30.0, True, True)]  # fmt: skip
    fill_rows(rows, fates, registered, [(0.0, 10.0), (10.0, 20.0)])
    a, b = rows
    assert (a.rounds, a.promoted, a.rejected) == (2, 1, 1)
    assert (b.rounds, b.promoted, b.rejected) == (2, 2, 0)
    assert (a.consolidation, b.consolidation) == (0, 1)
    assert a.freshness_median_s == 2.0 and a.freshness_events == 2
    assert b.freshness_median_s == 10.0
    assert (a.never_trained, a.pending, b.never_trained, b.pending) == (0, 1, 1, 1)
    empty = [Row(0, 2)]
    fill_rows(empty, Fates([None, None], [False] * 2, [True] * 2), [], [(0.0, 1.0)])
    assert empty[0].freshness_median_s is None  # not measured is not zero


def test_registered_at_turns_the_loops_monotonic_stamps_into_wall_time() -> None:
    now = time.monotonic()
    at = registered_at(
        [{"version": 1, "promoted": True, "started": now - 3.0, "seconds": 1.0},
         {"version": 2, "promoted": False},
         {"version": 3, "promoted": False, "kind": "consolidation", "started": now, "seconds": 1}]
    )  # fmt: skip
    assert len(at) == 2 and at[0][1] is True and at[0][2] is False
    assert at[1][1:] == (False, True)
    assert abs(at[0][0] - (time.time() - 2.0)) < 0.5


def test_summary_table_and_plot(tmp_path: Path) -> None:
    rows = [Row(10, 20, champion=1, ndcg_champion=0.12, ndcg_static=0.10, rounds=3, promoted=2,
                rejected=1, freshness_median_s=4.0),
            Row(20, 30, champion=3, ndcg_champion=0.11, ndcg_static=0.09, freshness_median_s=5.0,
                gap=0.02, gap_se=0.004, verdict="ahead"),
            Row(30, 40)]  # fmt: skip
    fresh: list[float | None] = [None] * 10 + [float(i % 7) for i in range(30)]
    fates = Fates(fresh, [False] * 40, [False] * 39 + [True])
    ledger = ledger_of([_record(1, True), _record(2, False), _record(3, True)])
    served = {"queries_ok": 5, "queries_failed": 0, "versions_served": [1, 3]}
    rec = summary(rows, fates, 10, ledger, 1, served, 12.34)
    assert (rec["rounds"], rec["promoted"], rec["rejected"]) == (3, 2, 1)
    # v1 as the champion of a slice is no comparison: the updated champion's slices only
    assert rec["updated_ndcg10_next"] == 0.11 and rec["static_ndcg10_next"] == 0.09
    assert rec["ahead_of_static_every_slice"] is True and rec["compared_slices"] == 1
    assert (rec["slices_ahead"], rec["slices_ahead_95"], rec["slices_behind_95"]) == (1, 1, 0)
    both = summary(rows, fates, 10, ledger, None, served, 1.0)
    assert both["updated_ndcg10_next"] == 0.115 and both["static_ndcg10_next"] == 0.095
    assert rec["pending"] == 1 and rec["never_trained"] == 0
    assert math.isfinite(rec["freshness_median_s"]) and rec["freshness_p99_s"] >= 5.0
    assert rec["queries_ok"] == 5 and rec["versions_served"] == [1, 3]
    assert len(rec["per_row"]) == 3 and rec["per_row"][2]["ndcg_champion"] is None
    rows[1].ndcg_static = 0.2
    assert summary(rows, fates, 10, ledger, 1, served, 1.0)["ahead_of_static_every_slice"] is False
    none = summary([Row(10, 40)], Fates([None] * 40, [False] * 40, [False] * 40), 10, ledger,
                   1, served, 1.0)  # fmt: skip
    assert none["freshness_median_s"] is None and none["ahead_of_static_every_slice"] is False
    console = Console(width=200, record=True)
    console.print(table(rows))
    text = console.export_text()
    assert "10-20" in text and "0.1200" in text and "v3" in text
    assert "+0.0200 ±0.0078 ahead" in text  # the lead, 1.96 standard errors, its verdict
    assert plot(rows, tmp_path / "q.png").stat().st_size > 10_000


def test_places_of_maps_replay_order_to_buffer_offsets() -> None:
    events = [Event(event_id=f"e{i}", user_id="u", item_id="i", event_type=EventType.CLICK, ts=i)
              for i in range(3)]  # fmt: skip
    buffered = pa.table({"event_id": ["e2", "x", "e0"], "topic": ["t", "t", "u"],
                         "partition": [0, 0, 1], "offset": [7, 8, 3]})  # fmt: skip
    places, index = places_of(buffered, events)
    assert places == [("u:1", 3), None, ("t:0", 7)]
    assert index.tolist() == [2, -1, 0]


def test_clock_numbers_events_across_stamp_calls() -> None:
    clock = Clock()
    events = [Event(event_id=f"e{i}", user_id="u", item_id="i", event_type=EventType.CLICK, ts=i)
              for i in range(5)]  # fmt: skip
    assert list(clock.stamp(events[:2])) == events[:2]
    assert list(clock.stamp(events[2:])) == events[2:]
    assert len(clock.times) == 5 and clock.times == sorted(clock.times)
    assert clock.published(4) == clock.times[4]
    assert clock.published(9) >= clock.times[4]  # not yet published: now
