"""The one ranking core: every place that turns scores into a rank, a metric or a top-k uses it.

The gate (``training.gate`` via ``training.metrics``), ``streamtune eval``, the demo's scoring,
the offline and streaming benchmarks (``training.evaluation``, ``bench.quality``) and the serving
candidate pick (``top_k``) share these rules, so a model cannot look better in one than another.

Rules
-----
- Column 0 is padding (vocab row 0 / catalog code 0): never a candidate, never a valid target.
- The rank of a target is the number of *other* candidates scored greater than **or equal** to it
  (0 = top). Ties count against the model: a constant scorer ranks every target last.
- A non-finite score counts against the model: a NaN or ``+inf`` candidate beats the target; a
  target scored NaN or ``+/-inf`` is a miss (``MISS_RANK``). ``-inf`` is the deliberate
  "cannot recommend" mark (padding, unknown items, exclusions): such a candidate never beats a
  finite target, and a target marked so is a miss. A NaN model therefore scores 0, never 1.
- A target outside the scores' columns (an item the model does not know) is a miss.
- Seen items are excluded here and only here (``candidate_mask``): every item the user already
  interacted with leaves the candidates, except the target itself (re-consumption still counts).

NDCG@k = 1 / log2(rank + 2) if rank < k else 0; HR@k = 1 if rank < k (one relevant item).
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Sequence
from itertools import chain

import numpy as np
import torch

MISS_RANK = 1 << 30  # the rank of a target that cannot be scored: outside every top-k

# Scores held at once by a full ranking (questions x catalog): 8M cells, ~200 MB with the float64
# copy and masks ranking makes; 512 questions a batch at 10k items, 8 at 1M.
SCORE_CELLS = 1 << 23

ArrayLike = np.ndarray | torch.Tensor


def as_numpy(scores: ArrayLike) -> np.ndarray:
    """Scores as a float numpy array (torch tensors of any float dtype included)."""
    if isinstance(scores, torch.Tensor):
        return scores.detach().float().cpu().numpy()
    return np.asarray(scores)


def score_batch(wanted: int, n_cols: int) -> int:
    """Rows per full-ranking batch over ``n_cols`` columns: ``wanted``, at most ``SCORE_CELLS``."""
    return max(1, min(wanted, SCORE_CELLS // max(1, n_cols)))


def excluded_cells(
    exclude: Sequence[Collection[int]], b: int, n_cols: int
) -> tuple[np.ndarray, np.ndarray]:
    """``(row, column)`` of every row's excluded items inside ``0..n_cols-1``, in one flat pass
    (a Python loop per row cost the gate ~10 ms a model on a few hundred questions)."""
    if len(exclude) != b:
        raise ValueError(f"{len(exclude)} exclusion lists for {b} targets; need one per row")
    lengths = [len(items) for items in exclude]
    flat = np.fromiter(chain.from_iterable(exclude), dtype=np.int64, count=sum(lengths))
    at = np.repeat(np.arange(b), lengths)
    keep = (flat >= 0) & (flat < n_cols)
    return at[keep], flat[keep]


def candidate_mask(
    n_cols: int, targets: np.ndarray, exclude: Sequence[Collection[int]] | None
) -> np.ndarray:
    """``[B, n_cols]`` bool: which columns compete with each row's target.

    Padding (column 0) and each row's ``exclude`` items (its history) are out; the target column
    is out too (it does not compete with itself). Ids outside ``0..n_cols-1`` are ignored: an item
    the model does not know is no candidate of that model.
    """
    b = len(targets)
    valid = np.ones((b, n_cols), dtype=bool)
    valid[:, 0] = False
    if exclude is not None:
        at, flat = excluded_cells(exclude, b, n_cols)
        valid[at, flat] = False
    rows = np.arange(b)
    inside = (targets > 0) & (targets < n_cols)
    valid[rows[inside], targets[inside]] = False
    return valid


def rank_against(
    target_scores: np.ndarray, competitors: np.ndarray, valid: np.ndarray | None = None
) -> np.ndarray:
    """0-based ranks: per row, how many valid ``competitors`` score >= the target, or are NaN.

    ``target_scores`` [B], ``competitors`` [B, C], ``valid`` [B, C] (default: all). A target
    whose own score is not finite gets ``MISS_RANK``.
    """
    t = np.asarray(target_scores, dtype=np.float64)
    c = np.asarray(competitors, dtype=np.float64)
    if c.ndim != 2 or c.shape[0] != t.shape[0]:
        raise ValueError(f"competitors {c.shape} must be [B, C] with B = {t.shape[0]} targets")
    with np.errstate(invalid="ignore"):
        beats = (c >= t[:, None]) | np.isnan(c)
    if valid is not None:
        beats &= valid
    ranks = beats.sum(axis=1).astype(np.int64)
    return np.where(np.isfinite(t), ranks, MISS_RANK)


def rank_full(
    scores: ArrayLike, targets: ArrayLike, exclude: Sequence[Collection[int]] | None = None
) -> np.ndarray:
    """Ranks of ``targets`` [B] among every column of ``scores`` [B, V] but padding and each row's
    ``exclude`` (seen) items; a target outside ``1..V-1`` is a miss."""
    s = as_numpy(scores)
    t = np.asarray(as_numpy(targets), dtype=np.int64)
    if s.ndim != 2 or s.shape[0] != len(t):
        raise ValueError(f"scores {s.shape} and {len(t)} targets must agree ([B, V] and [B])")
    inside = (t > 0) & (t < s.shape[1])
    target_scores = np.full(len(t), np.nan)
    target_scores[inside] = s[np.arange(len(t))[inside], t[inside]]
    valid = candidate_mask(s.shape[1], t, exclude)
    ranks = rank_against(target_scores, s, valid)
    return np.where(inside, ranks, MISS_RANK)


def popularity_ranks(
    counts: np.ndarray, targets: ArrayLike, exclude: Sequence[Collection[int]]
) -> np.ndarray:
    """``rank_full``'s ranks when every row's scores are ``counts`` [V], without a [B, V] score
    matrix (1M items x 2,000 questions is 16 GB as float64): a target's rank is the number of
    candidates counted at least as often, from the sorted counts, less the row's excluded items
    that are."""
    c = np.asarray(counts, dtype=np.float64)
    t = np.asarray(as_numpy(targets), dtype=np.int64)
    v, b = len(c), len(t)
    at, flat = excluded_cells(exclude, b, v)
    inside = (t > 0) & (t < v)
    own = np.where(inside, c[np.clip(t, 0, v - 1)], np.inf)
    ordered = np.sort(c[1:])  # padding is no candidate
    ranks = len(ordered) - np.searchsorted(ordered, own, side="left") - 1  # less the target
    beats = (flat > 0) & (flat != t[at]) & (c[flat] >= own[at])
    row, item = at[beats], flat[beats]
    row = row[once_each(row, item, v)]  # an item excluded twice in a row is one candidate less
    ranks -= np.bincount(row, minlength=b)
    return np.where(inside, ranks, MISS_RANK)


def once_each(rows: np.ndarray, cols: np.ndarray, n_cols: int) -> np.ndarray:
    """Mask keeping one of each distinct (row, column) pair; ``rows`` ascending. Each pair's
    position is written into a scratch [rows, n_cols] table (at most ``SCORE_CELLS`` cells at a
    time) and read back: the entry whose position stayed is the one kept. Linear, where
    ``np.unique`` over row * n_cols + col keys took 5.7 s on 5.8M keys (the gate over a user
    history that had seen most of a 3,000-item catalog)."""
    keep = np.zeros(len(rows), dtype=bool)
    if not len(rows):
        return keep
    per = score_batch(int(rows[-1] - rows[0]) + 1, n_cols)
    scratch = np.empty((per, n_cols), dtype=np.int64)
    for first in range(int(rows[0]), int(rows[-1]) + 1, per):
        lo, hi = np.searchsorted(rows, [first, first + per])
        r, c = rows[lo:hi] - first, cols[lo:hi]
        ids = np.arange(lo, hi)
        scratch[r, c] = ids
        keep[lo:hi] = scratch[r, c] == ids
    return keep


def rank_sampled(scores: ArrayLike, targets: ArrayLike, negatives: np.ndarray) -> np.ndarray:
    """Ranks of ``targets`` [B] among themselves plus the row's ``negatives`` [B, K] columns."""
    s = as_numpy(scores)
    t = np.asarray(as_numpy(targets), dtype=np.int64)
    neg = np.asarray(negatives, dtype=np.int64)
    inside = (t > 0) & (t < s.shape[1])
    rows = np.arange(len(t))
    target_scores = np.full(len(t), np.nan)
    target_scores[inside] = s[rows[inside], t[inside]]
    neg_ok = (neg > 0) & (neg < s.shape[1])
    neg_scores = s[rows[:, None], np.where(neg_ok, neg, 0)]
    ranks = rank_against(target_scores, neg_scores, neg_ok)
    return np.where(inside, ranks, MISS_RANK)


def question_ndcg(ranks: ArrayLike, k: int = 10) -> np.ndarray:
    """NDCG@k of each question: 1/log2(rank+2) inside the top k, else 0."""
    r = np.asarray(as_numpy(ranks), dtype=np.float64)
    out = np.zeros_like(r)
    hit = r < k
    out[hit] = 1.0 / np.log2(r[hit] + 2.0)
    return out


def ndcg_hr(ranks: ArrayLike, k: int = 10) -> tuple[float, float]:
    """Mean NDCG@k and HR@k of 0-based ranks (0.0, 0.0 for no questions)."""
    r = np.asarray(as_numpy(ranks), dtype=np.float64)
    if r.size == 0:
        return 0.0, 0.0
    return float(question_ndcg(r, k).mean()), float((r < k).mean())


def top_k(scores: ArrayLike, k: int, exclude: Iterable[int] | None = None) -> torch.Tensor:
    """Indices of the (at most) ``k`` best columns of one score vector [V], best first.

    Same rules as ranking: padding (column 0) and ``exclude`` are never picked, and neither is a
    column whose score is not finite (NaN, +/-inf): a broken score is no recommendation. Fewer
    than ``k`` indices come back when fewer columns qualify.
    """
    s = as_numpy(scores)
    if s.ndim != 1:
        raise ValueError(f"top_k takes one score vector [V], got shape {tuple(s.shape)}")
    return top_k_rows(s[None], k, [exclude])[0]


def top_k_rows(
    scores: ArrayLike, k: int, exclude: Sequence[Iterable[int] | None] | None = None
) -> list[torch.Tensor]:
    """``top_k`` of each row of [B, V] scores (``exclude``: one per row, or None), in one pass:
    what a batch of requests costs once instead of once per request."""
    s = torch.from_numpy(np.asarray(as_numpy(scores), dtype=np.float32))
    if s.ndim != 2:
        raise ValueError(f"top_k_rows takes [B, V] scores, got shape {tuple(s.shape)}")
    b, v = s.shape
    # One pass over the scores (torch.where over isfinite makes three, which dominated the
    # top-k at large catalogs; docs/benchmarks.md, "large catalogs").
    s = torch.nan_to_num(s, nan=float("-inf"), posinf=float("-inf"), neginf=float("-inf"))
    if v:
        s[:, 0] = float("-inf")
    if exclude:
        # One flat pass over every row's items, as in ``candidate_mask`` (a Python loop per item
        # was most of a served request's top-k).
        lists = [list(ex) if ex is not None else [] for ex in exclude]
        counts = [len(x) for x in lists]
        cols = np.fromiter(chain.from_iterable(lists), dtype=np.int64, count=sum(counts))
        at = np.repeat(np.arange(len(lists)), counts)
        inside = (cols >= 0) & (cols < v)
        s[torch.from_numpy(at[inside]), torch.from_numpy(cols[inside])] = float("-inf")
    n = min(max(int(k), 0), v)
    if n == 0:
        return [torch.zeros(0, dtype=torch.long) for _ in range(b)]
    vals, idx = torch.topk(s, n, dim=1)
    keep = vals > float("-inf")
    return [idx[i][keep[i]] for i in range(b)]
