"""The click model of the demo and the benchmarks (``services.click_model``): relevance only
from the user's next N events, clicks only on relevant items, examination falling with position
as configured."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError

from services.click_model import ClickModel


def test_relevance_is_the_next_window_events_only() -> None:
    cm = ClickModel(window=3, eta=1.0)
    future = np.array([7, 8, 9, 10, 11])
    assert cm.relevant([10, 9, 7, 1], future).tolist() == [False, True, True, False]
    assert cm.relevant([1, 2], []).tolist() == [False, False]


def test_examination_follows_the_position_bias() -> None:
    assert ClickModel(eta=1.0).examination(4) == pytest.approx([1, 1 / 2, 1 / 3, 1 / 4])
    assert ClickModel(eta=0.0).examination(3) == pytest.approx([1, 1, 1])
    rng = np.random.default_rng(0)
    seen = ClickModel(eta=2.0).examined(200_000, 3, rng).mean(axis=0)
    assert seen == pytest.approx([1, 1 / 4, 1 / 9], abs=0.01)


def test_clicks_only_on_wanted_items_at_the_biased_rate() -> None:
    cm = ClickModel(window=2, eta=1.0)
    rng = np.random.default_rng(1)
    shown, future = [5, 6, 1, 2], [2, 6, 5]  # 5 is past the window
    counts = np.zeros(4)
    n = 20_000
    for _ in range(n):
        for pos in cm.clicks(shown, future, rng):
            counts[pos] += 1
    assert counts[0] == 0 and counts[2] == 0  # never a click on an unwanted item
    assert counts[1] / n == pytest.approx(1 / 2, abs=0.02)
    assert counts[3] / n == pytest.approx(1 / 4, abs=0.02)


def test_parameters_are_validated_and_described() -> None:
    with pytest.raises(ValidationError):
        ClickModel(window=0)
    with pytest.raises(ValidationError):
        ClickModel(eta=-1.0)
    assert "next 10 events" in ClickModel().describe()
