"""The promotion gate: a candidate replaces the champion only if it is not worse on the newest
events and has not forgotten the past (held-out replay), each within a tolerance."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from training.config import GateConfig
from training.data import Holdout
from training.metrics import evaluate, popularity_ndcg
from training.model import Recommender


@dataclass
class GateResult:
    promote: bool
    reason: str
    metrics: dict[str, float] = field(default_factory=dict)


def gate(
    candidate: Recommender,
    champion: Recommender | None,
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
    m["champ_new_ndcg10"] = evaluate(champion, new_hold)["ndcg10"]
    tol = cfg.tolerance
    if m["cand_new_ndcg10"] < m["champ_new_ndcg10"] - tol:
        return GateResult(
            False,
            f"worse on newest events: NDCG@10 {m['cand_new_ndcg10']:.4f} < champion "
            f"{m['champ_new_ndcg10']:.4f} - {tol}",
            m,
        )
    if has_replay:
        m["champ_replay_ndcg10"] = evaluate(champion, replay_hold)["ndcg10"]
        if m["cand_replay_ndcg10"] < m["champ_replay_ndcg10"] - tol:
            return GateResult(
                False,
                f"forgot the past: replay NDCG@10 {m['cand_replay_ndcg10']:.4f} < champion "
                f"{m['champ_replay_ndcg10']:.4f} - {tol}",
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
