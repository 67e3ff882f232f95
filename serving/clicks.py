"""Online quality: which items each user was just served, by which version, and whether the user
then engaged with one of them (a click, cart or purchase event on a served item within
``CLICK_WINDOW_S``). Kept by the history shard that holds the user: it sees the user's events, and
the bookkeeping grows with users, so it scales out with them.

An interleaved answer (a live trial's; see ``serving.interleaving``) also remembers which team
contributed each position. Its clicks credit the contributing version's click-through, and once
the impression is settled (the user was served again, or ``settle_s`` passed) team draft's rule
turns its clicks into one outcome, a win for a, for b or a tie, counted per trial.

A click can reach the shard before the replica's report of the answer it belongs to (replicas
report every 0.5 s): engagement with an item not known as served is held for ``EARLY_S`` and
credited when the report comes.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass, field

from serving.interleaving import credit
from serving.version_stats import VersionStats, forget_versions

ENGAGED = {"click", "cart", "purchase"}
CLICK_WINDOW_S = 600.0
FORGET_EVERY_S = 60.0
# By default an interleaved impression's outcome is final after this long (``settle_s``): the
# engagement a trial counts comes within a user's next few events, minutes in live traffic;
# waiting the whole click window would delay every decision by ten minutes.
SETTLE_S = 120.0
# A replica reports what it served every 0.5 s, so a quick click can reach the shard first; such a
# click is held this long for the answer it belongs to, then forgotten.
EARLY_S = 5.0
# What a trial's settled impressions add up to, per history shard: outcomes, and the clicks that
# decided them by the team whose item was clicked.
TALLY = ("a_won", "b_won", "ties", "a_clicks", "b_clicks")
# A tally's place of an outcome's count, and of a team's credited clicks.
WON_AT = {o: TALLY.index(name) for o, name in (("a", "a_won"), ("b", "b_won"), ("tie", "ties"))}
CLICKS_AT = {team: TALLY.index(f"{team}_clicks") for team in ("a", "b")}
TRIALS_KEPT = 50  # trials whose tallies a shard keeps (the controller reads the running one)


@dataclass(frozen=True)
class Served:
    """One answer as the click side needs it: its items and who ranked them.

    Not interleaved: ``version`` ranked every item. Interleaved (``trial`` set): ``teams[i]``
    ("a" or "b") says which of ``version`` (team a) and ``other`` (team b) contributed
    ``items[i]``; "=" that both did (a shared pick).
    """

    items: list[str]
    version: str
    trial: str | None = None
    teams: str = ""
    other: str | None = None

    def versions_at(self, pos: int) -> tuple[str, ...]:
        """The versions that showed ``items[pos]``: both for a shared pick, which each would
        have shown there."""
        team = self.teams[pos] if self.teams else "a"
        if self.other is None or team == "a":
            return (self.version,)
        return (self.other,) if team == "b" else (self.version, self.other)


@dataclass(eq=False)
class _Impression:
    served: Served
    at: float
    unclicked: set[str]
    clicked: set[int] = field(default_factory=set)  # positions
    settled: bool = False


class ClickBook:
    def __init__(self, settle_s: float = SETTLE_S) -> None:
        self.settle_s = settle_s
        # user -> the user's latest answer, oldest report first
        self.served: OrderedDict[str, _Impression] = OrderedDict()
        self.stats: dict[str, VersionStats] = {}
        # interleaved impressions not settled yet, oldest first
        self.unsettled: deque[_Impression] = deque()
        # trial id -> [a wins, b wins, ties, clicks credited to a, to b] of its settled impressions
        self.trials: OrderedDict[str, list[int]] = OrderedDict()
        # engagement with items not (yet) known as served to the user: user -> [(item, at)],
        # and the same in arrival order, to let them go after EARLY_S
        self.early: dict[str, list[tuple[str, float]]] = {}
        self._early_order: deque[tuple[float, str]] = deque()
        self._forgot_at = 0.0

    def _stats(self, version: str) -> VersionStats:
        st = self.stats.get(version)
        if st is None:
            st = self.stats[version] = VersionStats()
        return st

    def record_served(self, served: dict[str, Served], now: float) -> None:
        """A replica's answers since its last report, per user."""
        self._let_go_early(now)
        for user, answer in served.items():
            before = self.served.pop(user, None)
            if before is not None:
                self._settle(before)  # the user moved on: its outcome is what it is
            imp = self.served[user] = _Impression(answer, now, set(answer.items))
            if answer.trial is not None:
                self.unsettled.append(imp)
            for pos in range(len(answer.items)):
                for version in answer.versions_at(pos):
                    self._stats(version).add_served(1, at=now)
            for item, _ in self.early.pop(user, []):  # clicks that came before this report
                self._credit(imp, item)
        if now - self._forgot_at > FORGET_EVERY_S:
            self.forget(now)

    def on_event(self, user: str, item: str, kind: str, now: float) -> None:
        if kind not in ENGAGED:
            return
        imp = self.served.get(user)
        if imp is None or item not in imp.served.items:
            # perhaps an answer whose report is still on its way: held for it
            self._let_go_early(now)
            self.early.setdefault(user, []).append((item, now))
            self._early_order.append((now, user))
            return
        if now - imp.at < CLICK_WINDOW_S:
            self._credit(imp, item)

    def _let_go_early(self, now: float) -> None:
        while self._early_order and self._early_order[0][0] < now - EARLY_S:
            _, user = self._early_order.popleft()
            kept = [(i, t) for i, t in self.early.get(user, []) if t >= now - EARLY_S]
            if kept:
                self.early[user] = kept
            else:
                self.early.pop(user, None)

    def _credit(self, imp: _Impression, item: str) -> None:
        if item not in imp.unclicked:
            return
        pos = imp.served.items.index(item)
        for version in imp.served.versions_at(pos):
            self._stats(version).add_click(served_at=imp.at)
        imp.unclicked.discard(item)  # one click per served item
        if not imp.settled:
            imp.clicked.add(pos)

    def _settle(self, imp: _Impression) -> None:
        """Count an interleaved impression's outcome into its trial, once."""
        trial = imp.served.trial
        if trial is None or imp.settled:
            return
        imp.settled = True
        outcome = credit(imp.served.teams, imp.clicked).outcome  # type: ignore[arg-type]
        tally = self.trials.get(trial)
        if tally is None:
            tally = self.trials[trial] = [0] * len(TALLY)
            while len(self.trials) > TRIALS_KEPT:
                self.trials.popitem(last=False)
        tally[WON_AT[outcome]] += 1
        for pos in imp.clicked:
            team = imp.served.teams[pos]
            if team in CLICKS_AT:  # a shared pick's click credits neither version
                tally[CLICKS_AT[team]] += 1

    def trial_counts(self, trial: str, now: float) -> list[int]:
        """``TALLY`` of ``trial``'s impressions settled so far; first settles the ones served
        more than ``settle_s`` ago."""
        self._settle_due(now)
        return list(self.trials.get(trial, [0] * len(TALLY)))

    def _settle_due(self, now: float) -> None:
        while self.unsettled and self.unsettled[0].at < now - self.settle_s:
            self._settle(self.unsettled.popleft())

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
        self._settle_due(now)
        while self.served:
            user, imp = next(iter(self.served.items()))
            if now - imp.at < CLICK_WINDOW_S:
                break
            del self.served[user]
        forget_versions(self.stats, set(), now)
