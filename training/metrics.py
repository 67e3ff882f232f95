"""Ranking metrics of a model on held-out questions (one relevant item per question).

A thin layer over ``training.ranking``, which owns every rule (ties and non-finite scores count
against the model, unknown items are misses, seen items are excluded). This module only feeds a
model's scores for a ``Holdout`` into it; the gate, ``streamtune eval`` and the demo call it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

import numpy as np
import torch

from training.data import Holdout
from training.ranking import (
    ndcg_hr,
    popularity_ranks,
    question_ndcg,
    rank_full,
    score_batch,
)

__all__ = [
    "Z95",
    "PairedGap",
    "RowScorer",
    "clustered_se",
    "evaluate",
    "holdout_ranks",
    "ndcg_hr",
    "paired_gap",
    "popularity_ndcg",
    "question_ndcg",
]


class RowScorer(Protocol):
    """Anything that scores vocab rows from left-padded histories, like ``Recommender``."""

    @property
    def n_rows(self) -> int: ...

    def eval(self) -> object: ...

    def score(self, inputs: torch.Tensor) -> torch.Tensor: ...


@torch.no_grad()
def holdout_ranks(model: RowScorer, hold: Holdout, batch: int = 512) -> np.ndarray:
    """0-based full-ranking rank of each question's target ([U]); ``training.ranking`` rules."""
    model.eval()
    parts = []
    batch = score_batch(batch, model.n_rows)
    for s in range(0, len(hold), batch):
        h = torch.from_numpy(hold.histories[s : s + batch])
        # Items newer than this model (an older champion) are unknown to it: read as padding.
        h = torch.where(h < model.n_rows, h, torch.zeros_like(h))
        scores = model.score(h)
        parts.append(rank_full(scores, hold.targets[s : s + batch], hold.seen[s : s + batch]))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def evaluate(model: RowScorer, hold: Holdout, k: int = 10, batch: int = 512) -> dict[str, float]:
    """Full-ranking NDCG@k / HR@k; items the user has seen (but not the target) are excluded."""
    rank = holdout_ranks(model, hold, batch)
    ndcg, hr = ndcg_hr(rank, k)
    return {f"ndcg{k}": ndcg, f"hr{k}": hr, "n": float(len(rank))}


def popularity_ndcg(counts: np.ndarray, hold: Holdout, k: int = 10) -> float:
    """NDCG@k of ranking by popularity (counts per row), same rules as ``evaluate``."""
    return ndcg_hr(popularity_ranks(counts, hold.targets, hold.seen), k)[0]


def clustered_se(x: np.ndarray, groups: np.ndarray | None) -> float:
    """Standard error of ``x.mean()`` when the values of a group are correlated (the sandwich
    estimator with the small-sample factor G/(G-1)); with one value per group it is the usual
    ``std(ddof=1) / sqrt(n)``."""
    n = len(x)
    if groups is None:
        groups = np.arange(n)
    _, g = np.unique(groups, return_inverse=True)
    n_groups = int(g.max()) + 1 if n else 0
    if n_groups < 2:
        return 0.0
    sums = np.bincount(g, weights=x - x.mean(), minlength=n_groups)  # [G]
    return float(np.sqrt(n_groups / (n_groups - 1) * (sums**2).sum()) / n)


Z95 = 1.96  # standard errors either side of a mean for a two-sided 95% interval


@dataclass(frozen=True)
class PairedGap:
    """Model b's mean NDCG@k minus model a's over the questions both were asked, with its
    standard error clustered by user (a user's questions share a history, so they rise and fall
    together)."""

    mean: float
    se: float
    questions: int

    def verdict(self, z: float = Z95) -> Literal["ahead", "behind", "within noise"]:
        """Where b stands against a at ``z`` standard errors (``Z95``: a 95% interval)."""
        if self.mean - z * self.se > 0:
            return "ahead"
        if self.mean + z * self.se < 0:
            return "behind"
        return "within noise"


def paired_gap(
    ranks_a: np.ndarray, hold_a: Holdout, ranks_b: np.ndarray, hold_b: Holdout, k: int = 10
) -> PairedGap:
    """Pair two models' answers by the event each question asks about (``Holdout.asked``; each
    holdout built by ``data.next_slice_holdout`` from the same slice and seed). Each model was
    asked with its own vocabulary, so a question one of them could not be asked (none of the
    user's earlier items known to it) is left out of the pair."""
    if hold_a.asked is None or hold_b.asked is None or hold_b.users is None:
        raise ValueError("paired_gap needs holdouts that say which event each question asks")
    _, ia, ib = np.intersect1d(hold_a.asked, hold_b.asked, return_indices=True)
    if len(ia) == 0:
        return PairedGap(0.0, 0.0, 0)
    diff = question_ndcg(ranks_b[ib], k) - question_ndcg(ranks_a[ia], k)
    return PairedGap(float(diff.mean()), clustered_se(diff, hold_b.users[ib]), len(ia))
