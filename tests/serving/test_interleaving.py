"""Team-draft interleaving: the answer's shape, each team's order, fairness, and click credit."""

from __future__ import annotations

import random

import pytest

from serving.interleaving import Credit, Interleaved, Team, credit, team_draft


def _rankings(rng: random.Random, n_items: int = 30, length: int = 12) -> tuple[list[int], ...]:
    items = list(range(n_items))
    return tuple(rng.sample(items, length) for _ in range(2))


def test_no_duplicates_k_respected_and_each_team_in_its_own_order() -> None:
    rng = random.Random(0)
    for _ in range(500):
        a, b = _rankings(rng)
        k = rng.randint(0, 14)
        out = team_draft(a, b, k, rng)
        assert len(out.items) == len(out.teams) == min(k, len(set(a) | set(b)))
        assert len(set(out.items)) == len(out.items)
        for team, ranking in (("a", a), ("b", b)):
            mine = [it for it, t in zip(out.items, out.teams, strict=True) if t == team]
            assert all(it in ranking for it in mine)
            assert mine == sorted(mine, key=ranking.index)  # its own order, best first
            # A team never passes over an unshown item of its ranking for a worse one.
            for it in mine:
                better = ranking[: ranking.index(it)]
                shown_before = set(out.items[: out.items.index(it)])
                assert set(better) <= shown_before


def test_teams_stay_balanced() -> None:
    rng = random.Random(1)
    for _ in range(200):
        a, b = _rankings(rng)
        out = team_draft(a, b, 10, rng)
        for i in range(1, len(out.teams) + 1):
            prefix = out.teams[:i]
            assert abs(prefix.count("a") - prefix.count("b")) <= 1


def test_first_pick_is_a_fair_coin() -> None:
    rng = random.Random(2)
    a, b = list(range(10)), list(range(10, 20))
    n = 20_000
    firsts = sum(team_draft(a, b, 10, rng).teams[0] == "a" for _ in range(n))
    # 5 standard deviations of a fair coin's count: a seeded check, not a flaky one.
    assert abs(firsts - n / 2) < 5 * (n / 4) ** 0.5


def test_disjoint_rankings_share_positions_evenly() -> None:
    rng = random.Random(3)
    a, b = list(range(10)), list(range(10, 20))
    counts = {"a": [0] * 10, "b": [0] * 10}
    n = 4000
    for _ in range(n):
        out = team_draft(a, b, 10, rng)
        for i, t in enumerate(out.teams):
            counts[t][i] += 1
    for i in range(10):
        assert abs(counts["a"][i] - n / 2) < 5 * (n / 4) ** 0.5


class _CountingCoin(random.Random):
    """ "a" picks first every round; counts the coins drawn."""

    def __init__(self) -> None:
        super().__init__(0)
        self.drawn = 0

    def random(self) -> float:
        self.drawn += 1
        return 0.0


def test_identical_rankings_are_shared_picks_only_and_never_decide() -> None:
    ranking = list(range(20))
    coin = _CountingCoin()
    out = team_draft(ranking, ranking, 10, coin)
    assert list(out.items) == ranking[:10]
    assert out.teams == ("=",) * 10
    assert coin.drawn == 0
    assert credit(out.teams, range(10)).outcome == "tie"  # whatever is clicked


def test_a_shared_pick_draws_no_coin_and_credits_neither() -> None:
    coin = _CountingCoin()
    out = team_draft([1, 2, 3, 9], [1, 4, 3, 8], 6, coin)
    # round 1: both pick 1 (shared); round 2: 2 and 4 by the coin; round 3: both pick 3 (shared)
    assert out.items == (1, 2, 4, 3, 9, 8)
    assert out.teams == ("=", "a", "b", "=", "a", "b")
    assert coin.drawn == 2
    assert credit(out.teams, [0, 3]) == Credit(0, 0)
    assert credit(out.teams, [0, 2, 3]).outcome == "b"


def test_exhausted_ranking_is_filled_by_the_other() -> None:
    rng = random.Random(4)
    out = team_draft([1, 2], [3, 4, 5, 6, 7], 6, rng)
    assert sorted(out.items) == [1, 2, 3, 4, 5, 6]
    assert out.teams.count("a") == 2 and out.teams.count("b") == 4
    assert team_draft([], [], 5, rng).items == ()
    assert team_draft([1, 2], [2, 1], 5, rng).items in ((1, 2), (2, 1))


def test_overlapping_items_go_to_the_team_that_picks_them_first() -> None:
    out = team_draft([1, 2, 3], [2, 4, 5], 4, _CountingCoin())
    assert out.items == (1, 2, 3, 4)  # b's best, 2, is a's second: b picked it first
    assert out.teams == ("a", "b", "a", "b")


def test_negative_k_is_refused() -> None:
    with pytest.raises(ValueError):
        team_draft([1], [2], -1, random.Random(0))


def test_credit_counts_clicked_items_per_team_and_picks_the_winner() -> None:
    teams: tuple[Team, ...] = ("a", "b", "b", "a", "b")
    assert credit(teams, []) == Credit(0, 0)
    assert credit(teams, []).outcome == "tie"
    assert credit(teams, [0]).outcome == "a"
    assert credit(teams, [1, 2, 0]) == Credit(1, 2)
    assert credit(teams, [1, 2, 0]).outcome == "b"
    assert credit(teams, [0, 1]).outcome == "tie"
    assert credit(teams, [1, 1, 1]) == Credit(0, 1)  # a position counts once
    with pytest.raises(ValueError):
        credit(teams, [5])


def test_credit_from_clicked_items_ignores_items_not_shown() -> None:
    out = Interleaved(items=("x", "y", "z"), teams=("b", "a", "b"))
    assert out.positions_of(["z", "q", "x"]) == [0, 2]
    assert out.credit(["z", "q", "x"]) == Credit(0, 2)
    assert out.credit(["y"]).outcome == "a"
