"""Team-draft interleaving of two versions' rankings, and crediting clicks to the versions.

Team draft (Radlinski, Kurup and Joachims, "How does clickthrough data reflect retrieval
quality?", CIKM 2008): the answer is built in rounds; in each round a fair coin decides which
version picks first, then each version in turn contributes its best item not yet shown. Every
position remembers the version ("a" or "b") that contributed it. A click on a position credits
that version, and the version with more clicked items wins the impression (equal counts, none
included, are a tie).

Why per-round coins: the two teams stay the same size (to within one item) and each gets the
better positions equally often, so under equal rankers neither version is favoured by position
bias. The coins come from a caller-given ``random.Random`` so serving can seed it per request and
benchmarks can replay it.

Shared picks: when, in a round, both versions' best unshown item is the same, it is shown once,
as team "=" (both), with no coin drawn, and a click on it credits neither. Which version the coin
would have named is pure chance there, so crediting it adds a coin flip's noise to the outcome and
nothing about which version ranks better; the clicks that decide come from the positions where
the two rankings differ. Two equal rankings give an answer of shared picks only: every impression
a tie, never a decision.

Pure Python (no numpy, torch or Ray): serving calls it once per interleaved request. Rankings are
the caller's, best first, with seen items already excluded; items are anything hashable (catalog
codes in benchmarks, item ids in serving). If one ranking runs out, the other fills the rest.

Public API:
  team_draft(ranking_a, ranking_b, k, rng) -> Interleaved       items + per-position team
  Interleaved.positions_of(clicked_items) -> list[int]          positions of clicked items
  credit(teams, clicked_positions) -> Credit                    wins per team + the outcome
  Interleaved.credit(clicked_items) -> Credit                   the same, from clicked items
"""

from __future__ import annotations

import random
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass
from typing import Generic, Literal, TypeVar

Team = Literal["a", "b", "="]  # "=": both versions' pick in the same round (a shared pick)
SHARED: Team = "="
Outcome = Literal["a", "b", "tie"]
Item = TypeVar("Item", bound=Hashable)


@dataclass(frozen=True)
class Credit:
    """One impression's clicks: clicked items per team and who won the impression."""

    wins_a: int
    wins_b: int

    @property
    def outcome(self) -> Outcome:
        if self.wins_a > self.wins_b:
            return "a"
        if self.wins_b > self.wins_a:
            return "b"
        return "tie"


@dataclass(frozen=True)
class Interleaved(Generic[Item]):
    """An interleaved answer: ``items[i]`` was contributed by version ``teams[i]``."""

    items: tuple[Item, ...]
    teams: tuple[Team, ...]

    def positions_of(self, clicked_items: Iterable[Item]) -> list[int]:
        """Positions (0-based, sorted) of the clicked items that were shown; others ignored,
        since a click on an item not in this answer is no evidence about it."""
        where = {item: i for i, item in enumerate(self.items)}
        return sorted({where[it] for it in clicked_items if it in where})

    def credit(self, clicked_items: Iterable[Item]) -> Credit:
        return credit(self.teams, self.positions_of(clicked_items))


def _next_unshown(ranking: Sequence[Item], start: int, shown: set[Item]) -> int:
    """Index of the first item of ``ranking`` at or after ``start`` not yet shown
    (``len(ranking)`` when none is left)."""
    i = start
    while i < len(ranking) and ranking[i] in shown:
        i += 1
    return i


def team_draft(
    ranking_a: Sequence[Item], ranking_b: Sequence[Item], k: int, rng: random.Random
) -> Interleaved[Item]:
    """Interleave two rankings (best first) into at most ``k`` positions by team draft.

    Each round draws one coin (``rng.random() < 0.5``: "a" picks first), unless both versions'
    best unshown item is the same: then that item is a shared pick ("=") and no coin is drawn. A
    version whose ranking is exhausted skips its turn, so the other fills. Fewer than ``k`` items
    come back only when the two rankings together hold fewer distinct items.
    """
    if k < 0:
        raise ValueError(f"k={k}: ask for zero or more positions")
    items: list[Item] = []
    teams: list[Team] = []
    shown: set[Item] = set()
    rankings = {"a": ranking_a, "b": ranking_b}
    cursor = {"a": 0, "b": 0}
    while len(items) < k:
        for team in cursor:
            cursor[team] = _next_unshown(rankings[team], cursor[team], shown)
        at_a, at_b = cursor["a"], cursor["b"]
        if at_a < len(ranking_a) and at_b < len(ranking_b) and ranking_a[at_a] == ranking_b[at_b]:
            items.append(ranking_a[at_a])
            teams.append(SHARED)
            shown.add(ranking_a[at_a])
            continue
        order: tuple[Team, Team] = ("a", "b") if rng.random() < 0.5 else ("b", "a")
        picked = False
        for team in order:
            if len(items) == k:
                break
            ranking = rankings[team]
            i = _next_unshown(ranking, cursor[team], shown)
            if i == len(ranking):
                cursor[team] = i
                continue
            items.append(ranking[i])
            teams.append(team)
            shown.add(ranking[i])
            cursor[team] = i + 1
            picked = True
        if not picked:  # both rankings exhausted
            break
    return Interleaved(tuple(items), tuple(teams))


def credit(teams: Sequence[Team], clicked_positions: Iterable[int]) -> Credit:
    """Credit each clicked position (0-based; repeats count once) to the team that contributed
    it, a shared pick to neither; the team with more clicked items wins the impression
    (team-draft's rule)."""
    wins = {"a": 0, "b": 0, SHARED: 0}
    for pos in set(clicked_positions):
        if not 0 <= pos < len(teams):
            raise ValueError(f"clicked position {pos} outside the answer's {len(teams)} positions")
        wins[teams[pos]] += 1
    return Credit(wins["a"], wins["b"])
