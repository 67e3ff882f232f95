"""``serving.heap.freeze_startup``: what exists is frozen, garbage first collected, and what comes
later is still collected."""

from __future__ import annotations

import gc
import subprocess
import sys
import weakref
from collections.abc import Iterator

import pytest

from serving.heap import freeze_startup


class Node:
    def __init__(self) -> None:
        self.other: Node | None = None


def cycle() -> weakref.ref[Node]:
    """An unreachable reference cycle; the weak reference tells whether it was collected."""
    a, b = Node(), Node()
    a.other, b.other = b, a
    return weakref.ref(a)


@pytest.fixture
def unfrozen() -> Iterator[None]:
    yield
    gc.unfreeze()  # the rest of the test session collects as usual


@pytest.mark.usefixtures("unfrozen")
def test_freezes_what_lives_and_collects_what_comes_later() -> None:
    kept = [Node() for _ in range(1000)]
    before = cycle()
    frozen = freeze_startup()
    assert before() is None  # start-up garbage was collected, not frozen in
    assert frozen >= len(kept) and gc.get_freeze_count() == frozen
    assert not any(gc.is_tracked(n) and n in gc.get_objects(generation=2) for n in kept[:3])

    later = cycle()
    assert later() is not None
    gc.collect()
    assert later() is None  # a cycle made after the freeze is collected as before
    assert gc.get_freeze_count() == frozen  # and the frozen ones stay out of the walk


def test_a_frozen_process_exits_without_leak_reports() -> None:
    """nanobind (in triton) reports the objects it owns still alive at shutdown; frozen ones are
    given back to the collector at exit, so a clean exit prints nothing."""
    pytest.importorskip("triton")
    code = "import triton; from serving.heap import freeze_startup; freeze_startup()"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, check=True)  # fmt: skip
    assert "leaked" not in done.stderr, done.stderr[-2000:]
