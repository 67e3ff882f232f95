"""Long work is never silent: a line when a step starts, one every few seconds, one at the end."""

from __future__ import annotations

import time

import pytest

from streams.progress import working


def test_a_long_step_reports_while_it_runs() -> None:
    lines: list[str] = []
    with working("building", every_s=0.1, say=lines.append):
        time.sleep(0.55)
    assert lines[0] == "building ..."
    ticks = [x for x in lines if "still working" in x]
    assert 3 <= len(ticks) <= 6, lines
    assert lines[-1].startswith("building: done in ")


def test_a_failed_step_says_so_and_raises() -> None:
    lines: list[str] = []
    with pytest.raises(RuntimeError), working("fetching", every_s=10.0, say=lines.append):
        raise RuntimeError("no network")
    assert lines[0] == "fetching ..." and lines[-1].startswith("fetching: failed in ")
