"""The freshness accounting: which version first trained an event, and how fresh it went live."""

from __future__ import annotations

from services.freshness import Ledger, live_freshness, weighted_percentile


def _span(lo: int, hi: int, ts: int = 0) -> dict[str, object]:
    return {"after": {"t:0": lo}, "upto": {"t:0": hi}, "events": hi - lo, "ts_q": [ts] * 21}


RECORDS = [
    {"version": 1, "promoted": True, "trained": [_span(0, 100, 1_000)], "dropped": []},
    {"version": 2, "promoted": False, "trained": [], "dropped": []},  # 100-150, carried
    {
        "version": 3,
        "promoted": True,
        "dropped": [],
        "trained": [_span(100, 150, 2_000), _span(150, 200, 3_000)],
    },
    {"version": 4, "promoted": False, "trained": [], "dropped": [_span(200, 230)]},
]


def test_an_event_belongs_to_the_first_promoted_version_that_trained_on_it() -> None:
    ledger = Ledger(RECORDS)
    assert ledger.first_trained_by("t:0", 0) == 1
    assert ledger.first_trained_by("t:0", 120) == 3  # rejected in v2, carried by v3
    assert ledger.first_trained_by("t:0", 199) == 3
    assert ledger.first_trained_by("t:0", 210) is None and ledger.dropped("t:0", 210)
    assert ledger.first_trained_by("t:1", 0) is None  # another partition: nothing there
    assert ledger.never_trained_events() == 30


def test_a_version_counts_as_live_once_it_or_a_later_promoted_version_answered() -> None:
    ledger = Ledger(RECORDS)
    assert ledger.live_at(1, {3: 50.0}) == 50.0  # v1 itself never answered; v3 descends from it
    assert ledger.live_at(3, {1: 10.0}) is None
    assert ledger.live_at(1, {1: 10.0, 3: 50.0}) == 10.0


def test_live_freshness_over_a_window_weights_rounds_by_their_events() -> None:
    # v1 live at t=2 s (its events at 1 s: 1 s fresh), v3 at t=13 s (events at 2-3 s: 10-11 s).
    out = live_freshness(RECORDS, [(1, 2.0), (3, 13.0)], window_s=60.0, now=20.0)
    assert out["p50_s"] == 1.0  # 100 of the 200 events were 1 s fresh
    assert out["p99_s"] == 11.0
    assert live_freshness(RECORDS, [(1, 2.0)], window_s=5.0, now=20.0)["p50_s"] is None


def test_weighted_percentile() -> None:
    assert weighted_percentile([], 50) is None
    assert weighted_percentile([(1.0, 1), (5.0, 3)], 50) == 5.0
    assert weighted_percentile([(1.0, 3), (5.0, 1)], 50) == 1.0
