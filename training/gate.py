"""The promotion gate: a candidate replaces the champion only if it is not worse on the newest
events and has not forgotten the past (held-out replay), each within a tolerance.

Both models answer the same held-out questions, so the comparison is paired: per question, the
champion's NDCG@10 minus the candidate's. A candidate is rejected when that mean drop exceeds
``tolerance`` by more than ``confidence_z`` standard errors of the mean. A few hundred held-out
users make NDCG@10 noisy (a standard error near 0.01 is common), and a fixed tolerance alone then
rejects good candidates by coin flip; a real regression (a broken model) is far outside the noise
and is still rejected. ``confidence_z = 0`` gives the plain tolerance rule.

Scores go through ``training.ranking`` (ties and non-finite scores count against the model), so a
collapsed or NaN candidate scores 0 and can never pass.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from training.config import GateConfig
from training.data import Holdout
from training.metrics import RowScorer, evaluate, holdout_ranks, popularity_ndcg
from training.ranking import question_ndcg


@dataclass
class GateResult:
    promote: bool
    reason: str
    metrics: dict[str, float] = field(default_factory=dict)


def paired_drop(candidate: RowScorer, champion: RowScorer, hold: Holdout) -> tuple[float, float]:
    """Mean per-question NDCG@10 drop (champion - candidate) and its standard error."""
    champ = question_ndcg(holdout_ranks(champion, hold))
    cand = question_ndcg(holdout_ranks(candidate, hold))
    diff = champ - cand
    se = float(diff.std(ddof=1) / np.sqrt(len(diff))) if len(diff) > 1 else 0.0
    return float(diff.mean()), se


def gate(
    candidate: RowScorer,
    champion: RowScorer | None,
    new_hold: Holdout,
    replay_hold: Holdout,
    popularity: np.ndarray,
    cfg: GateConfig,
) -> GateResult:
    m: dict[str, float] = {}
    if len(new_hold) < cfg.min_eval_users:
        return GateResult(
            False,
            f"only {len(new_hold)} held-out users (< min_eval_users={cfg.min_eval_users}): "
            "quality cannot be measured; wait for more events",
            m,
        )
    m["cand_new_ndcg10"] = evaluate(candidate, new_hold)["ndcg10"]
    m["pop_new_ndcg10"] = popularity_ndcg(popularity, new_hold)
    has_replay = len(replay_hold) > 0
    if has_replay:
        m["cand_replay_ndcg10"] = evaluate(candidate, replay_hold)["ndcg10"]
    if champion is None:
        # The first version has nothing to beat but popularity.
        ok = m["cand_new_ndcg10"] > m["pop_new_ndcg10"]
        why = (
            f"first version: NDCG@10 {m['cand_new_ndcg10']:.4f} vs popularity "
            f"{m['pop_new_ndcg10']:.4f}"
        )
        return GateResult(ok, why, m)
    sets = [("new", new_hold)] + ([("replay", replay_hold)] if has_replay else [])
    for name, hold in sets:
        drop, se = paired_drop(candidate, champion, hold)
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
            if has_replay
            else ""
        ),
        m,
    )
