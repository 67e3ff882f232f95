"""Offline evaluation: datasets as buffer tables, leave-one-out splits, ranking metrics.

Public API
----------
- ``load_table(path)``: MovieLens-100K folder (default ``../shared/data/ml-100k``) or a
  ``user,item,ts[,rating]`` CSV as an Arrow table with the buffer's columns (``ARROW_SCHEMA``),
  time ordered, ``topic="offline"``, ``partition=0``, ``offset`` = row index.
- ``encode(table) -> Interactions``: dense integer codes (items ``1..n_items``, 0 is padding).
- ``leave_one_out(inter) -> LooSplit``: per user, test target = last event, validation target =
  second last; the rest trains.
- ``Scorer``: anything with ``score(histories) -> [B, n_items + 1]`` in *catalog* item codes.
  ``PopularityScorer`` is the baseline; the trainer's model is adapted by ``ModelScorer``.
- ``rank_full`` / ``rank_sampled`` / ``sample_negatives`` / ``evaluate_cases``: the two protocols.
- ``intra_list_diversity(item_lists, item_emb)``: for MMR re-ranking reports.

Ranking conventions (both protocols)
------------------------------------
``training.ranking`` owns them (the gate uses the same core): the rank of a target is the number
of other candidates scored greater than *or equal to* it (0 = top), so ties count against the
model; non-finite scores count against the model too (a NaN or constant scorer ranks the target
last); a target a model cannot score (``-inf``, unknown) is a miss. NDCG@k = 1/log2(rank + 2) if
rank < k else 0; HR@k = 1 if rank < k.

- Full ranking: candidates = every catalog item except padding and the items in the user's
  history (the target stays a candidate even if it was seen before).
- Sampled: candidates = the target + 100 negatives drawn *without replacement* from the items the
  user never interacted with (in their whole sequence, target included). Sampling is uniform by
  default (the SASRec paper's protocol); ``popularity=True`` draws proportionally to training
  counts instead (a harder protocol).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import pyarrow as pa
import torch

from streams.datasets import DEFAULT_ML100K, generic_csv, movielens_100k
from streams.events import RowBatch
from training.data import left_pad
from training.model import Recommender
from training.ranking import ndcg_hr as _core_ndcg_hr
from training.ranking import rank_full as _core_rank_full
from training.ranking import rank_sampled as _core_rank_sampled
from training.ranking import score_batch
from training.vocab import ItemVocab

OFFLINE_TOPIC = "offline"


def load_table(path: Path | None = None) -> pa.Table:
    """Read a dataset into the buffer's Arrow schema, sorted by time (ties keep file order).

    ``path`` is a MovieLens-100K folder (with ``u.data``) or a ``.csv`` file; ``None`` means the
    shared MovieLens-100K copy.
    """
    path = DEFAULT_ML100K if path is None else Path(path)
    if path.is_dir():
        events = movielens_100k(path)
    elif path.suffix.lower() == ".csv":
        events = generic_csv(path)
    elif not path.exists():
        raise FileNotFoundError(
            f"{path} does not exist: pass a MovieLens-100K folder or a user,item,ts[,rating] CSV"
        )
    else:
        raise ValueError(f"{path}: expected a folder with u.data or a .csv file")
    if not events:
        raise ValueError(f"{path} holds no events; it needs at least one user,item,ts row")
    batch = RowBatch()
    # The loaders return events in time order already; the offset records that order.
    for offset, event in enumerate(events):
        batch.append(event, OFFLINE_TOPIC, 0, offset)
    return batch.to_table()


@dataclass(frozen=True)
class Interactions:
    """A time-ordered event table coded as integers; row ``r`` is row ``r`` of ``table``."""

    table: pa.Table
    users: np.ndarray  # int64 user code per row
    items: np.ndarray  # int64 item code per row, 1..n_items
    user_ids: list[str]
    item_ids: list[str]  # item_ids[c - 1] is the id of code c

    @property
    def n_items(self) -> int:
        return len(self.item_ids)

    def rows_by_user(self) -> list[np.ndarray]:
        """Row indices of each user's events, in time order (index = user code)."""
        order = np.argsort(self.users, kind="stable")  # stable keeps time order within a user
        bounds = np.cumsum(np.bincount(self.users, minlength=len(self.user_ids)))[:-1]
        return np.split(order, bounds)


def encode(table: pa.Table) -> Interactions:
    """Code users and items densely; items by first appearance so earlier items get lower codes."""
    missing = {"user_id", "item_id", "ts"} - set(table.column_names)
    if missing:
        raise ValueError(f"table lacks columns {sorted(missing)}; build it with load_table()")
    ts = table.column("ts").to_numpy()
    if len(ts) > 1 and bool(np.any(np.diff(ts) < 0)):
        raise ValueError("table is not sorted by ts; sort it (stable) before encoding")
    user_col = table.column("user_id").to_pylist()
    item_col = table.column("item_id").to_pylist()
    user_code: dict[str, int] = {}
    item_code: dict[str, int] = {}
    users = np.fromiter((user_code.setdefault(u, len(user_code)) for u in user_col), np.int64)
    items = np.fromiter((item_code.setdefault(i, len(item_code) + 1) for i in item_col), np.int64)
    return Interactions(table, users, items, list(user_code), list(item_code))


@dataclass(frozen=True)
class Case:
    """One next-item prediction: the user's history (item codes, oldest first) and the target."""

    user: int
    history: np.ndarray
    target: int


@dataclass(frozen=True)
class LooSplit:
    """Leave-one-out: ``train_rows`` (table rows to train on), validation and test cases."""

    train_rows: np.ndarray
    valid: list[Case]
    test: list[Case]


def leave_one_out(inter: Interactions, min_events: int = 3) -> LooSplit:
    """Per user: last event = test target, second last = validation target, the rest = train.

    Users with fewer than ``min_events`` events only train (they have no history to evaluate).
    The test history includes the validation item, as in SASRec.
    """
    if min_events < 3:
        raise ValueError(f"min_events={min_events}: leave-one-out needs at least 3 per user")
    train: list[np.ndarray] = []
    valid: list[Case] = []
    test: list[Case] = []
    for user, rows in enumerate(inter.rows_by_user()):
        seq = inter.items[rows]
        if len(rows) < min_events:
            train.append(rows)
            continue
        train.append(rows[:-2])
        valid.append(Case(user, seq[:-2], int(seq[-2])))
        test.append(Case(user, seq[:-1], int(seq[-1])))
    return LooSplit(np.sort(np.concatenate(train)), valid, test)


class Scorer(Protocol):
    """Scores every catalog item for each history: returns float32 ``[len(histories), n+1]``.

    Column 0 (padding) is ignored; items a model cannot score should be ``-inf``.
    """

    def score(self, histories: Sequence[np.ndarray]) -> np.ndarray: ...


class PopularityScorer:
    """The most-popular baseline: every user gets the same scores, the training counts.

    With ``half_life`` (in events; ``train_items`` in time order), each event counts
    ``0.5 ** (age / half_life)``, age = how many events came after it: popularity with recency,
    the baseline a fresh catalog's trends make hard to beat.
    """

    def __init__(
        self, train_items: np.ndarray, n_items: int, half_life: float | None = None
    ) -> None:
        if train_items.size and (train_items.min() < 1 or train_items.max() > n_items):
            raise ValueError(f"item codes must lie in 1..{n_items} (0 is padding)")
        if half_life is not None and half_life <= 0:
            raise ValueError(f"half_life={half_life}: give a positive number of events")
        weights = None
        if half_life is not None:
            age = np.arange(train_items.size - 1, -1, -1, dtype=np.float64)
            weights = np.exp2(-age / half_life)
        counts = np.bincount(train_items, weights=weights, minlength=n_items + 1)
        self.counts = counts.astype(np.float32)

    def score(self, histories: Sequence[np.ndarray]) -> np.ndarray:
        return np.broadcast_to(self.counts, (len(histories), self.counts.size)).copy()


class ModelScorer:
    """Adapts the trainer's ``Recommender`` + ``ItemVocab`` to catalog codes.

    Histories are mapped to vocab rows (items the vocab lacks are dropped), cut to the model's
    ``max_len`` and left-padded as ``training.data`` does; items the vocab lacks score ``-inf``.
    """

    def __init__(self, model: Recommender, vocab: ItemVocab, item_ids: Sequence[str]) -> None:
        self.model = model
        rows = [vocab.index(i) for i in item_ids]
        # catalog code -> vocab row (0 = unknown); rows beyond the model's table are unknown too
        self.code_to_row = np.array([0] + [r or 0 for r in rows], dtype=np.int64)
        self.code_to_row[self.code_to_row >= model.n_rows] = 0
        self.known = self.code_to_row > 0

    @torch.no_grad()
    def score(self, histories: Sequence[np.ndarray]) -> np.ndarray:
        max_len = self.model.cfg.max_len
        batch = np.zeros((len(histories), max_len), dtype=np.int64)
        for b, hist in enumerate(histories):
            rows = self.code_to_row[hist]
            batch[b] = left_pad(rows[rows > 0].tolist(), max_len)
        self.model.eval()
        rows_scores = self.model.score(torch.from_numpy(batch)).float().numpy()
        out = np.full((len(histories), len(self.code_to_row)), -np.inf, dtype=np.float32)
        out[:, self.known] = rows_scores[:, self.code_to_row[self.known]]
        return out  # NaN stays NaN: the ranking core counts it against the model


def rank_full(scores: np.ndarray, targets: np.ndarray, seen: Sequence[np.ndarray]) -> np.ndarray:
    """Ranks of ``targets`` among all items except padding and each row's ``seen`` items."""
    if scores.ndim != 2 or scores.shape[0] != len(targets) or len(seen) != len(targets):
        raise ValueError(
            f"scores {scores.shape}, {len(targets)} targets and {len(seen)} seen lists must agree"
        )
    return _core_rank_full(scores, targets, seen)


def sample_negatives(
    rng: np.random.Generator,
    n_items: int,
    exclude: Sequence[np.ndarray],
    k: int = 100,
    weights: np.ndarray | None = None,
) -> np.ndarray:
    """``[len(exclude), k]`` item codes in ``1..n_items``, none in the row's ``exclude``.

    Drawn without replacement, uniformly or proportionally to ``weights`` (length n_items + 1).
    """
    out = np.empty((len(exclude), k), dtype=np.int64)
    base = np.ones(n_items + 1) if weights is None else np.asarray(weights, dtype=np.float64)
    if base.shape != (n_items + 1,):
        raise ValueError(f"weights must have n_items + 1 = {n_items + 1} entries")
    base = base + (1e-9 if weights is not None else 0.0)  # unseen items stay drawable
    base[0] = 0.0
    for r, items in enumerate(exclude):
        p = base.copy()
        p[items] = 0.0
        available = int((p > 0).sum())
        if available < k:
            raise ValueError(
                f"row {r}: only {available} items are unseen, cannot draw {k} negatives; "
                "lower the number of negatives or use full ranking"
            )
        out[r] = rng.choice(n_items + 1, size=k, replace=False, p=p / p.sum())
    return out


def rank_sampled(scores: np.ndarray, targets: np.ndarray, negatives: np.ndarray) -> np.ndarray:
    """Ranks of ``targets`` among themselves plus the row's ``negatives``."""
    return _core_rank_sampled(scores, targets, negatives)


def ndcg_hr(ranks: np.ndarray, k: int = 10) -> tuple[float, float]:
    """Mean NDCG@k and HR@k of 0-based ranks (one relevant item per case)."""
    if np.asarray(ranks).size == 0:
        raise ValueError("no cases to score: the split produced no evaluation events")
    return _core_ndcg_hr(ranks, k)


@dataclass(frozen=True)
class Metrics:
    ndcg10_full: float
    hr10_full: float
    ndcg10_sampled: float
    hr10_sampled: float
    cases: int


def evaluate_cases(
    scorer: Scorer,
    cases: Sequence[Case],
    n_items: int,
    exclude_for_negatives: Sequence[np.ndarray],
    seed: int = 0,
    negatives: int = 100,
    negative_weights: np.ndarray | None = None,
    batch_size: int = 512,
) -> Metrics:
    """Both protocols on ``cases``; negatives come from a generator seeded with ``seed`` so every
    scorer sees the same negatives."""
    if len(exclude_for_negatives) != len(cases):
        raise ValueError("exclude_for_negatives needs one item array per case")
    rng = np.random.default_rng(seed)
    negs = sample_negatives(rng, n_items, exclude_for_negatives, negatives, negative_weights)
    full: list[np.ndarray] = []
    sampled: list[np.ndarray] = []
    batch_size = score_batch(batch_size, n_items + 1)
    for start in range(0, len(cases), batch_size):
        batch = cases[start : start + batch_size]
        scores = scorer.score([c.history for c in batch])
        targets = np.array([c.target for c in batch], dtype=np.int64)
        full.append(rank_full(scores, targets, [c.history for c in batch]))
        sampled.append(rank_sampled(scores, targets, negs[start : start + len(batch)]))
    ndcg_f, hr_f = ndcg_hr(np.concatenate(full))
    ndcg_s, hr_s = ndcg_hr(np.concatenate(sampled))
    return Metrics(ndcg_f, hr_f, ndcg_s, hr_s, len(cases))


def intra_list_diversity(item_lists: Sequence[Sequence[int]], item_emb: np.ndarray) -> float:
    """Mean over lists of the mean pairwise cosine distance (1 - cos) between the list's items.

    ``item_emb[i]`` is item ``i``'s embedding; lists shorter than 2 are skipped. 0 = all items
    point the same way, 1 = orthogonal on average.
    """
    emb = np.asarray(item_emb, dtype=np.float64)
    if emb.ndim != 2:
        raise ValueError(f"item_emb must be [n_items, dim], got shape {emb.shape}")
    unit = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
    values: list[float] = []
    for items in item_lists:
        idx = np.asarray(items, dtype=np.int64)
        if idx.size < 2:
            continue
        if idx.min() < 0 or idx.max() >= len(unit):
            raise IndexError(f"item index out of range 0..{len(unit) - 1} in list {list(idx)}")
        v = unit[idx]
        sim = v @ v.T
        n = idx.size
        values.append(float((n * n - sim.sum()) / (n * (n - 1))))  # diagonal is 1 each
    if not values:
        raise ValueError("intra_list_diversity needs at least one list with 2 or more items")
    return float(np.mean(values))
