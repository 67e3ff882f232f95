"""``bench.live``'s trials: interleaved and A/B impressions replayed offline through the product's
interleaving (``serving.interleaving``), the click model (``services.click_model``) and the
sequential test (``training.sequential``).

**Interleaving.** An impression: a request drawn uniformly with replacement from the replayed
requests, both versions' top-k for it (ranked once, ``bench.live_models``), team-draft
interleaved, clicked by the click model, credited, and fed to the test after every impression.
Team draft with two full top-k lists draws at most ``ceil(k/2)`` coins (none in a round of a
shared pick), so each request has at most ``2 ** ceil(k/2)`` distinct answers; ``interleave_all``
runs ``team_draft`` once for each (request, coin pattern), and a trial draws the pattern
uniformly, which is the same distribution as drawing the coins per impression (bits a draft does
not use are ignored) at a fraction of the cost.

**A/B.** The same requests and click model, each request answered by one version alone: a 50/50
split done as matched pairs, two requests drawn independently, one answered by a and the other by
b. The pair's outcome is b wins / a wins / tie by which answer got more clicks, and the same
Bernoulli mSPRT (same alpha and prior) decides on the decisive pairs: under equal versions the
two sides of a pair are exchangeable, so P(b wins a decisive pair) = 1/2 exactly, as in the
interleaved test. A pair costs two impressions. Splitting by request, not by user, spares the A/B
the between-user variance a user split adds, so the comparison leans in the A/B's favour.

**The floor** (``floor_impressions``): how many impressions any level-alpha test on such
outcomes needs for a budget goal, for the report to tell "the test is slow" from "the clicks
carry too little".
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np

from services.click_model import ClickModel
from serving.interleaving import Team, credit, team_draft
from training.sequential import Decision, SequentialConfig, decision_of, log_lr_path

BLOCK = 2048  # impressions simulated per step: large enough for numpy, small past a decision


class _Coins(random.Random):
    """A ``random.Random`` whose ``random()`` replays a fixed coin pattern (bit j set: "a"
    picks first in round j), so ``team_draft`` runs unchanged on each pattern."""

    def __init__(self, pattern: int, rounds: int) -> None:
        super().__init__(0)
        self.pattern, self.rounds, self.drawn = pattern, rounds, 0

    def random(self) -> float:
        if self.drawn == self.rounds:
            raise RuntimeError("team draft drew more coins than ceil(k/2): a ranking ran short")
        bit = (self.pattern >> self.drawn) & 1
        self.drawn += 1
        return 0.0 if bit else 0.75


@dataclass(frozen=True)
class PairTables:
    """Everything a trial of one pair draws from, per request (R) and coin pattern (P)."""

    relevant: np.ndarray  # [R, P, k] bool: the interleaved item at that position is wanted
    teams: np.ndarray  # [R, P] int: index into team_codes of the positions' teams
    team_codes: list[tuple[Team, ...]]
    relevant_a: np.ndarray  # [R, k] bool: a's own top-k (the A/B arm)
    relevant_b: np.ndarray  # [R, k]


def interleave_all(top_a: np.ndarray, top_b: np.ndarray, futures: list[np.ndarray],
                   clicks: ClickModel) -> PairTables:  # fmt: skip
    """Team-draft every request's two top-k lists under every coin pattern."""
    n, k = top_a.shape
    rounds = -(-k // 2)
    patterns = 1 << rounds
    relevant = np.zeros((n, patterns, k), dtype=bool)
    teams = np.zeros((n, patterns), dtype=np.int64)
    codes: dict[tuple[Team, ...], int] = {}
    rel_a = np.zeros((n, k), dtype=bool)
    rel_b = np.zeros((n, k), dtype=bool)
    for r in range(n):
        a, b = top_a[r].tolist(), top_b[r].tolist()
        union = list(dict.fromkeys(a + b))
        wanted = dict(zip(union, clicks.relevant(union, futures[r]).tolist(), strict=True))
        rel_a[r] = [wanted[i] for i in a]
        rel_b[r] = [wanted[i] for i in b]
        for p in range(patterns):
            out = team_draft(a, b, k, _Coins(p, rounds))
            relevant[r, p] = [wanted[i] for i in out.items]
            teams[r, p] = codes.setdefault(out.teams, len(codes))
    return PairTables(relevant, teams, list(codes), rel_a, rel_b)


@dataclass(frozen=True)
class Trial:
    """One trial's end: the decision and the impressions it took (the cap if undecided)."""

    decision: Decision
    impressions: int
    wins: int  # decisive outcomes b won, up to the decision (or the cap)
    losses: int  # ... a won
    clicks: int  # clicked items over the impressions simulated (for the click rate)
    simulated: int  # impressions simulated (a block may run past the decision)


class _Run:
    """The test's running counts over a trial's decisive outcomes, block by block."""

    def __init__(self, cfg: SequentialConfig) -> None:
        self.cfg, self.wins, self.losses = cfg, 0, 0

    def feed(self, outcomes: np.ndarray, cost: int) -> tuple[Decision, int, int, int] | None:
        """Look after each of a block's ``outcomes`` (+1 b won, -1 a won, 0 tie; each costs
        ``cost`` impressions): the decision, the impressions into the block it took and the
        wins and losses then, or None to go on."""
        at = np.flatnonzero(outcomes)
        b_won = outcomes[at] > 0
        path = log_lr_path(b_won, self.cfg, self.wins, self.losses)
        crossed = np.flatnonzero(path >= self.cfg.threshold)
        if crossed.size:
            j = int(crossed[0])
            wins = self.wins + int(b_won[: j + 1].sum())
            losses = self.losses + (j + 1) - int(b_won[: j + 1].sum())
            return decision_of(wins, losses, self.cfg), (int(at[j]) + 1) * cost, wins, losses
        self.wins += int(b_won.sum())
        self.losses += int(b_won.size - b_won.sum())
        return None


def interleaved_trial(tables: PairTables, clicks: ClickModel, cfg: SequentialConfig, cap: int,
                      rng: np.random.Generator) -> Trial:  # fmt: skip
    """Interleaved impressions until the test decides or ``cap`` impressions."""
    n, patterns, k = tables.relevant.shape
    run, done, clicked_total = _Run(cfg), 0, 0
    while done < cap:
        m = min(BLOCK, cap - done)
        req, pat = rng.integers(n, size=m), rng.integers(patterns, size=m)
        clicked = tables.relevant[req, pat] & clicks.examined(m, k, rng)
        outcomes = np.zeros(m, dtype=np.int64)
        for i in np.flatnonzero(clicked.any(axis=1)):
            teams = tables.team_codes[tables.teams[req[i], pat[i]]]
            won = credit(teams, np.flatnonzero(clicked[i]).tolist()).outcome
            outcomes[i] = 1 if won == "b" else -1 if won == "a" else 0
        clicked_total += int(clicked.sum())
        decided = run.feed(outcomes, 1)
        if decided is not None:
            decision, into, wins, losses = decided
            return Trial(decision, done + into, wins, losses, clicked_total, done + m)
        done += m
    return Trial("continue", cap, run.wins, run.losses, clicked_total, done)


def ab_trial(tables: PairTables, clicks: ClickModel, cfg: SequentialConfig, cap: int,
             rng: np.random.Generator) -> Trial:  # fmt: skip
    """Matched A/B pairs (two impressions each) until the test decides or ``cap`` impressions."""
    n, k = tables.relevant_a.shape
    run, done, clicked_total = _Run(cfg), 0, 0
    while done < cap:
        m = min(BLOCK, (cap - done) // 2)
        if m == 0:
            break
        ca = (tables.relevant_a[rng.integers(n, size=m)] & clicks.examined(m, k, rng)).sum(1)
        cb = (tables.relevant_b[rng.integers(n, size=m)] & clicks.examined(m, k, rng)).sum(1)
        clicked_total += int(ca.sum() + cb.sum())
        decided = run.feed(np.sign(cb - ca), 2)
        if decided is not None:
            decision, into, wins, losses = decided
            return Trial(decision, done + into, wins, losses, clicked_total, done + 2 * m)
        done += 2 * m
    return Trial("continue", cap, run.wins, run.losses, clicked_total, done)


def floor_impressions(b_wins: float | None, decisive: float, alpha: float,
                      share: float) -> int | None:  # fmt: skip
    """Impressions a level-``alpha`` one-sided fixed-horizon test, knowing the effect, needs to
    decide right with probability ``share`` (normal approximation) when b wins a decisive
    impression with probability ``b_wins`` and ``decisive`` of the impressions are decisive;
    None without an effect."""
    if b_wins is None or b_wins == 0.5 or decisive <= 0:
        return None
    z = NormalDist().inv_cdf(1 - alpha) + NormalDist().inv_cdf(share)
    return round(z**2 / (4 * (b_wins - 0.5) ** 2) / decisive)
