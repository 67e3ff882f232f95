"""Ranking metrics of a model on held-out questions (one relevant item per question).

A thin layer over ``training.ranking``, which owns every rule (ties and non-finite scores count
against the model, unknown items are misses, seen items are excluded). This module only feeds a
model's scores for a ``Holdout`` into it; the gate, ``streamtune eval`` and the demo call it.
"""

from __future__ import annotations

from typing import Protocol

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
    "RowScorer",
    "evaluate",
    "holdout_ranks",
    "ndcg_hr",
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
