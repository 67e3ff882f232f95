"""Maximal-marginal-relevance re-ranking over item embeddings."""

from __future__ import annotations

import torch


def mmr(
    scores: torch.Tensor, emb: torch.Tensor, candidates: torch.Tensor, k: int, diversity: float
) -> list[int]:
    """Pick k of ``candidates`` (rows) balancing relevance and novelty.

    scores [V] relevance, emb [V, D] unit-norm item rows, candidates [C] rows sorted by score.
    diversity 0 = pure relevance; 1 = only dissimilarity to what is already picked.
    """
    if diversity <= 0.0 or k <= 1:
        return candidates[:k].tolist()
    rel = scores[candidates]
    rel = (rel - rel.min()) / (rel.max() - rel.min() + 1e-9)  # [C] in [0, 1]
    vecs = emb[candidates]  # [C, D]
    picked: list[int] = []
    max_sim = torch.full((len(candidates),), -1.0)
    available = torch.ones(len(candidates), dtype=torch.bool)
    for _ in range(min(k, len(candidates))):
        gain = (1 - diversity) * rel - diversity * max_sim.clamp(min=0)
        gain[~available] = float("-inf")
        j = int(gain.argmax())
        picked.append(int(candidates[j]))
        available[j] = False
        max_sim = torch.maximum(max_sim, vecs @ vecs[j])
    return picked


def intra_list_diversity(rows: list[int], emb: torch.Tensor) -> float:
    """Mean pairwise (1 - cosine) among the rows of one list."""
    if len(rows) < 2:
        return 0.0
    v = emb[torch.tensor(rows)]
    sim = v @ v.T
    n = len(rows)
    return float((1 - sim).sum() / (n * (n - 1)))
