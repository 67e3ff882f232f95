"""Event sources: MovieLens-100K from the shared folder, generic CSV, synthetic drift."""

from __future__ import annotations

from pathlib import Path

import pytest

from streams.datasets import DEFAULT_ML100K, DriftSpec, generic_csv, movielens_100k, synthetic_drift


def test_movielens_is_complete_and_time_ordered() -> None:
    events = movielens_100k(DEFAULT_ML100K)
    assert len(events) == 100_000
    assert len({e.event_id for e in events}) == 100_000
    ts = [e.ts for e in events]
    assert ts == sorted(ts)
    assert events[0].ts > 800_000_000_000  # seconds were converted to milliseconds
    assert sum(e.item_text is not None for e in events) == 100_000


def test_movielens_missing_folder_says_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"u\.data"):
        movielens_100k(tmp_path)


def test_generic_csv(tmp_path: Path) -> None:
    path = tmp_path / "mine.csv"
    path.write_text("user,item,ts,rating\na,x,1700000000,4\nb,y,1600000000000,\na,z,1500000000,2\n")
    events = generic_csv(path)
    assert [e.item_id for e in events] == ["z", "y", "x"]
    assert events[1].ts == 1_600_000_000_000 and events[1].event_type == "click"
    assert events[2].value == 4.0


def test_synthetic_drift_grows_catalog_and_shifts() -> None:
    spec = DriftSpec(users=20, events=4000, new_item_every=100, drift_every=1000)
    events = list(synthetic_drift(spec))
    assert len(events) == 4000
    assert len({e.event_id for e in events}) == 4000
    assert sum("new" in e.item_id for e in events) > 0
    # Deterministic under the seed.
    assert [e.item_id for e in synthetic_drift(spec)][:50] == [e.item_id for e in events[:50]]
    first = {e.item_id.split("-")[0] for e in events[:1000] if e.user_id == "u0"}
    later = {e.item_id.split("-")[0] for e in events[1000:2000] if e.user_id == "u0"}
    assert first != later  # u0's topic moved
