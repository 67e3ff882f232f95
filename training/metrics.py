"""Ranking metrics for next-item prediction (one relevant item per question)."""

from __future__ import annotations

import numpy as np
import torch

from training.data import Holdout
from training.model import Recommender


def ranks(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """0-based rank of each target among its row's scores ([B, V], [B] -> [B])."""
    target_scores = scores.gather(1, targets[:, None])  # [B, 1]
    return (scores > target_scores).sum(1)


def ndcg_hr(rank: torch.Tensor, k: int = 10) -> tuple[float, float]:
    """Mean NDCG@k and HR@k from 0-based ranks."""
    if len(rank) == 0:
        return 0.0, 0.0
    hit = rank < k
    ndcg = torch.where(hit, 1.0 / torch.log2(rank.float() + 2.0), torch.zeros(()))
    return float(ndcg.mean()), float(hit.float().mean())


@torch.no_grad()
def holdout_ranks(model: Recommender, hold: Holdout, batch: int = 512) -> torch.Tensor:
    """0-based full-ranking rank of each question's target ([U]); seen items (not the target)
    are excluded, and a target the model does not know ranks last (a miss)."""
    model.eval()
    all_ranks = []
    for s in range(0, len(hold), batch):
        h = torch.from_numpy(hold.histories[s : s + batch])
        # Items newer than this model (an older champion) are unknown to it: drop them.
        h = torch.where(h < model.n_rows, h, torch.zeros_like(h))
        t = torch.from_numpy(hold.targets[s : s + batch])
        scores = model.score(h)
        for j, seen in enumerate(hold.seen[s : s + batch]):
            idx = [i for i in seen if i != int(t[j]) and i < scores.shape[1]]
            if idx:
                scores[j, idx] = float("-inf")
        valid = t < scores.shape[1]  # targets unknown to an older model count as misses
        r = torch.full_like(t, scores.shape[1])
        r[valid] = ranks(scores[valid], t[valid])
        all_ranks.append(r)
    return torch.cat(all_ranks) if all_ranks else torch.zeros(0, dtype=torch.long)


def question_ndcg(rank: torch.Tensor, k: int = 10) -> np.ndarray:
    """NDCG@k of each question (one relevant item: 1/log2(rank+2) inside the top k, else 0)."""
    gain = torch.where(rank < k, 1.0 / torch.log2(rank.float() + 2.0), torch.zeros(()))
    return gain.numpy().astype(np.float64)


def evaluate(model: Recommender, hold: Holdout, k: int = 10, batch: int = 512) -> dict[str, float]:
    """Full-ranking NDCG@k / HR@k; items the user has seen (but not the target) are excluded."""
    rank = holdout_ranks(model, hold, batch)
    ndcg, hr = ndcg_hr(rank, k)
    return {f"ndcg{k}": ndcg, f"hr{k}": hr, "n": float(len(rank))}


def popularity_ndcg(counts: np.ndarray, hold: Holdout, k: int = 10) -> float:
    """NDCG@k of ranking by popularity (counts per row), same exclusions as ``evaluate``."""
    scores = torch.from_numpy(counts.astype(np.float32)).repeat(len(hold), 1)
    scores[:, 0] = float("-inf")
    t = torch.from_numpy(hold.targets)
    for j, seen in enumerate(hold.seen):
        idx = [i for i in seen if i != int(t[j]) and i < scores.shape[1]]
        if idx:
            scores[j, idx] = float("-inf")
    return ndcg_hr(ranks(scores, t), k)[0]
