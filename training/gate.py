"""The promotion gate: a candidate replaces the champion only if it is not worse on the newest
events and has not forgotten the past (held-out replay), each within a tolerance.

Both models answer the same held-out questions, so the comparison is paired: per question, the
champion's NDCG@10 minus the candidate's. A candidate is rejected when that mean drop exceeds
``tolerance`` by more than ``confidence_z`` standard errors of the mean. A few hundred held-out
users make NDCG@10 noisy (a standard error near 0.01 is common), and a fixed tolerance alone then
rejects good candidates by coin flip; a real regression (a broken model) is far outside the noise
and is still rejected. ``confidence_z = 0`` gives the plain tolerance rule. The newest events give
several questions per user (``holdout_events``), and the error is clustered by user.

Scores go through ``training.ranking`` (ties and non-finite scores count against the model), so a
collapsed or NaN candidate scores 0 and can never pass.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from training.config import GateConfig
from training.data import Holdout
from training.metrics import RowScorer, clustered_se, holdout_ranks, popularity_ndcg
from training.ranking import ndcg_hr, question_ndcg


@dataclass
class GateResult:
    promote: bool
    reason: str
    metrics: dict[str, float] = field(default_factory=dict)


def paired_drop(champion: np.ndarray, candidate: np.ndarray, hold: Holdout) -> tuple[float, float]:
    """Mean per-question NDCG@10 drop (champion - candidate) and its standard error, from each
    model's 0-based ranks of ``hold``'s targets ([Q] each, ``metrics.holdout_ranks``).

    The error is clustered by user: one user's questions (their last few events) rise and fall
    together, so treating them as independent would understate it."""
    diff = question_ndcg(champion) - question_ndcg(candidate)
    return float(diff.mean()), clustered_se(diff, hold.users)


def question_sets(new_hold: Holdout, replay_hold: Holdout) -> list[tuple[str, Holdout]]:
    """The gate's question sets, by name: the newest events and (if any) the replay probes."""
    return [("new", new_hold)] + ([("replay", replay_hold)] if len(replay_hold) else [])


def question_ranks(
    model: RowScorer, new_hold: Holdout, replay_hold: Holdout
) -> dict[str, np.ndarray]:
    """A model's ranks on each question set. The champion's are known before the candidate
    is, so a round computes them while its candidate trains (``gate(..., champ_ranks=)``)."""
    sets = question_sets(new_hold, replay_hold)
    return {name: holdout_ranks(model, hold) for name, hold in sets}


def gate(
    candidate: RowScorer,
    champion: RowScorer | None,
    new_hold: Holdout,
    replay_hold: Holdout,
    popularity: np.ndarray,
    cfg: GateConfig,
    champ_ranks: dict[str, np.ndarray] | None = None,
) -> GateResult:
    """``champ_ranks``: ``question_ranks(champion, new_hold, replay_hold)`` if already computed."""
    m: dict[str, float] = {}
    if new_hold.n_users < cfg.min_eval_users:
        return GateResult(
            False,
            f"only {new_hold.n_users} held-out users (< min_eval_users={cfg.min_eval_users}): "
            "quality cannot be measured; wait for more events",
            m,
        )
    # Each model ranks each question set once; every figure below comes from those ranks.
    sets = question_sets(new_hold, replay_hold)
    cand_ranks = question_ranks(candidate, new_hold, replay_hold)
    for name, ranks in cand_ranks.items():
        m[f"cand_{name}_ndcg10"] = ndcg_hr(ranks)[0]
    m["pop_new_ndcg10"] = popularity_ndcg(popularity, new_hold)
    if champion is None:
        # The first version has nothing to beat but popularity.
        ok = m["cand_new_ndcg10"] > m["pop_new_ndcg10"]
        why = (
            f"first version: NDCG@10 {m['cand_new_ndcg10']:.4f} vs popularity "
            f"{m['pop_new_ndcg10']:.4f}"
        )
        return GateResult(ok, why, m)
    if champ_ranks is None:
        champ_ranks = question_ranks(champion, new_hold, replay_hold)
    for name, hold in sets:
        drop, se = paired_drop(champ_ranks[name], cand_ranks[name], hold)
        cand = m[f"cand_{name}_ndcg10"]
        m[f"champ_{name}_ndcg10"] = cand + drop
        m[f"{name}_drop_se"] = se
        if drop > cfg.tolerance + cfg.confidence_z * se:
            what = "worse on newest events" if name == "new" else "forgot the past: replay"
            return GateResult(
                False,
                f"{what} NDCG@10 {cand:.4f} < champion {cand + drop:.4f}: drop {drop:.4f} > "
                f"tolerance {cfg.tolerance} + {cfg.confidence_z} x SE {se:.4f}",
                m,
            )
    return GateResult(
        True,
        f"NDCG@10 new {m['cand_new_ndcg10']:.4f} (champion {m['champ_new_ndcg10']:.4f})"
        + (
            f", replay {m['cand_replay_ndcg10']:.4f} (champion {m['champ_replay_ndcg10']:.4f})"
            if len(sets) > 1
            else ""
        ),
        m,
    )
