"""Long work says what it is doing: a step's name when it starts, a line every few seconds while
it runs (with the seconds so far), and how long it took. Lines go to stderr, so they show in a
terminal and in a log alike, and leave a command's stdout to its result."""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


@contextmanager
def working(
    step: str, every_s: float = 5.0, say: Callable[[str], None] = _stderr
) -> Iterator[None]:
    """``with working("building SeaweedFS"):`` around a step that may take minutes."""
    t0 = time.monotonic()
    done = threading.Event()
    say(f"{step} ...")

    def tick() -> None:
        while not done.wait(every_s):
            say(f"{step}: still working, {time.monotonic() - t0:.0f}s")

    ticker = threading.Thread(target=tick, name="progress", daemon=True)
    ticker.start()
    ok = False
    try:
        yield
        ok = True
    finally:
        done.set()
        ticker.join()
        say(f"{step}: {'done' if ok else 'failed'} in {time.monotonic() - t0:.1f}s")
