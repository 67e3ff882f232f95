"""Online quality: which items each user was just served, by which version, and whether the user
then engaged with one of them (a click, cart or purchase event on a served item within
``CLICK_WINDOW_S``). Kept by the history shard that holds the user: it sees the user's events, and
the bookkeeping grows with users, so it scales out with them.
"""

from __future__ import annotations

from collections import OrderedDict

from serving.version_stats import VersionStats, forget_versions

ENGAGED = {"click", "cart", "purchase"}
CLICK_WINDOW_S = 600.0
FORGET_EVERY_S = 60.0


class ClickBook:
    def __init__(self) -> None:
        # user -> (version, items not yet clicked, served at), oldest report first
        self.served: OrderedDict[str, tuple[str, set[str], float]] = OrderedDict()
        self.stats: dict[str, VersionStats] = {}
        self._forgot_at = 0.0

    def _stats(self, version: str) -> VersionStats:
        st = self.stats.get(version)
        if st is None:
            st = self.stats[version] = VersionStats()
        return st

    def record_served(self, served: dict[str, tuple[str, list[str]]], now: float) -> None:
        """A replica's answers since its last report: per user, the version and the items."""
        for user, (version, items) in served.items():
            self.served[user] = (version, set(items), now)
            self.served.move_to_end(user)
            self._stats(version).add_served(len(items), at=now)
        if now - self._forgot_at > FORGET_EVERY_S:
            self.forget(now)

    def on_event(self, user: str, item: str, kind: str, now: float) -> None:
        served = self.served.get(user)
        if kind not in ENGAGED or served is None:
            return
        version, items, t = served
        if item in items and now - t < CLICK_WINDOW_S:
            self._stats(version).add_click(served_at=t)
            items.discard(item)  # one click per served item

    def window(self, version: str, since: float, until: float) -> dict[str, float]:
        st = self.stats.get(version)
        if st is None:
            return {"served": 0, "clicked": 0, "ctr": 0.0}
        return st.window(since, until)

    def totals(self, versions: list[str]) -> dict[str, tuple[int, int]]:
        """(served, clicked) of each of ``versions`` this book has seen."""
        return {v: (self.stats[v].served, self.stats[v].clicked) for v in versions
                if v in self.stats}  # fmt: skip

    def forget(self, now: float) -> None:
        """Drop answers past the click window (no click can be credited to them any more) and
        the stats of versions untouched for hours: both would otherwise grow forever."""
        self._forgot_at = now
        while self.served:
            user, (_, _, t) = next(iter(self.served.items()))
            if now - t < CLICK_WINDOW_S:
                break
            del self.served[user]
        forget_versions(self.stats, set(), now)
