"""A recurring failure is logged once when it starts and once when it ends, with its reason."""

from __future__ import annotations

import logging

import pytest

from serving.streak import Streak


def test_a_streak_logs_its_start_and_its_end_once(caplog: pytest.LogCaptureFixture) -> None:
    s = Streak(logging.getLogger("t"), "reading the registry")
    with caplog.at_level(logging.WARNING, logger="t"):
        s.ok()  # nothing failed: nothing to say
        for _ in range(5):
            s.failed(OSError("unreachable"), "serving v3 meanwhile")
        s.ok()
        s.ok()
    msgs = [r.getMessage() for r in caplog.records]
    assert msgs == [
        "reading the registry failed (OSError: unreachable); serving v3 meanwhile",
        "reading the registry works again after 5 failures",
    ]
