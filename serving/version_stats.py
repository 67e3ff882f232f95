"""Per-version serving statistics: request counts, errors and latencies, and click-through.

Click-through is kept in one-second buckets of *impression* time (a click is credited to the
bucket in which its item was served), so two versions can be compared over the same stretch of
time: ``window(since, until)`` returns the items a version served in ``[since, until)`` and how
many of those were clicked. The rollout controller compares the new version over the window since
its rollout with the previous version over a window of equal length ending now (so: the time just
before the rollout, plus any overlap in which it still served); see ``serving.rollout``. Buckets
older than ``BUCKET_KEEP_S`` are dropped.

The context actor keeps the request side (replicas report it); the history shards keep the click
side (they see the events and which items their users were served).
"""

from __future__ import annotations

import time
from collections import deque
from typing import Any

BUCKET_S = 1.0
BUCKET_KEEP_S = 3 * 3600.0
# A snapshot asked for no versions in particular carries the live replicas' versions and this many
# of the most recently active others.
SNAPSHOT_RECENT = 10


class VersionStats:
    def __init__(self) -> None:
        self.requests = 0
        self.errors = 0
        self.latencies: deque[float] = deque(maxlen=5000)
        self.served = 0
        self.clicked = 0
        self.first_seen = self.last_active = time.time()
        # bucket index (impression time // BUCKET_S) -> [served, clicked]
        self.buckets: dict[int, list[int]] = {}

    def add_served(self, n: int, at: float) -> None:
        self.last_active = max(self.last_active, at)
        self.served += n
        self.buckets.setdefault(int(at // BUCKET_S), [0, 0])[0] += n

    def add_click(self, served_at: float) -> None:
        self.last_active = time.time()
        self.clicked += 1
        self.buckets.setdefault(int(served_at // BUCKET_S), [0, 0])[1] += 1

    def window(self, since: float, until: float) -> dict[str, float]:
        lo, hi = int(since // BUCKET_S), int(until // BUCKET_S)
        served = clicked = 0
        for b, (s, c) in self.buckets.items():
            if lo <= b <= hi:
                served, clicked = served + s, clicked + c
        return {"served": served, "clicked": clicked,
                "ctr": clicked / served if served else 0.0}  # fmt: skip

    def forget_before(self, t: float) -> None:
        cut = int(t // BUCKET_S)
        for b in [b for b in self.buckets if b < cut]:
            del self.buckets[b]

    def summary(self, clicks: tuple[int, int] | None = None) -> dict[str, float]:
        """Requests, errors and p99 from here; served and clicked from here or, given, from
        ``clicks`` (the history shards' totals: they keep the click side)."""
        served, clicked = clicks if clicks is not None else (self.served, self.clicked)
        lat = sorted(self.latencies)
        p99 = lat[min(len(lat) - 1, int(0.99 * len(lat)))] if lat else 0.0
        return {
            "requests": self.requests,
            "errors": self.errors,
            "error_rate": self.errors / self.requests if self.requests else 0.0,
            "p99_ms": p99,
            "served": served,
            "clicked": clicked,
            "ctr": clicked / served if served else 0.0,
        }


def chosen_versions(stats: dict[str, VersionStats], live: set[str],
                    asked: list[str] | None) -> list[str]:  # fmt: skip
    """Whose stats a snapshot carries: those ``asked`` for, or (None) the ``live`` replicas'
    versions and the ``SNAPSHOT_RECENT`` most recently active others. Never every version ever
    served: with a round every few seconds that list grows by thousands an hour, and each
    snapshot (the rollout controller takes several a second) held the lock that history look-ups
    wait on for longer and longer."""
    if asked is not None:
        return [v for v in asked if v in stats]
    recent = set(sorted(stats, key=lambda v: stats[v].last_active)[-SNAPSHOT_RECENT:])
    return [v for v in stats if v in live or v in recent]


def versions_of(replicas: dict[str, dict[str, Any]]) -> set[str]:
    return {str(d["version"]) for d in replicas.values()}


def forget_versions(stats: dict[str, VersionStats], live: set[str], now: float) -> None:
    """Drop the stats of versions no live replica serves and nothing touched for
    ``BUCKET_KEEP_S`` (their click windows are empty by then): they would pile up forever."""
    for v in [v for v, st in stats.items()
              if v not in live and st.last_active < now - BUCKET_KEEP_S]:  # fmt: skip
        del stats[v]
    for st in stats.values():
        st.forget_before(now - BUCKET_KEEP_S)
