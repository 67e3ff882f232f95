"""``bench.live``'s offline side: the replayed requests, the versions compared, their rankings
and next-slice NDCG@10, and the paired bootstrap that says whether a difference is significant.

The stream (MovieLens-100K, time ordered) is cut at ``train_share``: the champion model trains on
the events before the cut with the trainer's in-process loop (``harness.strategies``); every event
after it with some history is a *request*: that user, at that point, with every earlier event as
history (seen items excluded from rankings) and their events from there on as the click model's
future. Next-slice NDCG@10 scores each request's own event, through the one ranking core.

Versions derived from the champion ``M`` (none trained twice):

- ``shuffled``: ``M`` with its item rows permuted (the tied table is the input embedding and the
  output layer, so ids mean other items on both sides): a clearly worse candidate.
- ``noised(scale)``: ``M`` with Gaussian noise of ``scale`` times each tensor's RMS added to every
  tensor; ``tune_noise`` finds the scale that costs a target share of ``M``'s NDCG@10 (bisection
  on one fixed noise draw, so the loss grows smoothly with the scale).
- an earlier epoch of ``M``'s own training run (``earlier_epoch``): the less trained copy whose
  NDCG@10 loss is closest to a target inside a range, if one falls inside it.
- a copy of ``M`` rebuilt from its weights: the same model under another version, scored apart.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from harness.prequential import StreamConfig
from harness.strategies import train_from_scratch
from training.evaluation import Case, Interactions, ModelScorer
from training.model import TABLE, Recommender
from training.ranking import question_ndcg, rank_full, top_k_rows
from training.vocab import ItemVocab


@dataclass(frozen=True)
class Replay:
    """The requests replayed after the cut, with each one's future for the click model."""

    inter: Interactions
    cut: int  # first row after the training part
    requests: list[Case]  # history = the user's items before, target = the request's own event
    futures: list[np.ndarray]  # the user's items from the request on (the request's first)

    @property
    def users(self) -> np.ndarray:
        return np.array([c.user for c in self.requests], dtype=np.int64)


def replay_of(inter: Interactions, train_share: float, max_requests: int | None,
              future_len: int, seed: int) -> Replay:  # fmt: skip
    """Requests = the events after the cut with a history (a seeded subsample of
    ``max_requests`` when given, kept in time order)."""
    n = len(inter.items)
    cut = round(train_share * n)
    by_user = inter.rows_by_user()
    seqs = [inter.items[rows] for rows in by_user]
    pos = np.empty(n, dtype=np.int64)
    for rows in by_user:
        pos[rows] = np.arange(len(rows))
    rows = np.arange(cut, n)
    rows = rows[pos[rows] > 0]
    if max_requests is not None and len(rows) > max_requests:
        rows = np.sort(np.random.default_rng(seed).choice(rows, max_requests, replace=False))
    requests, futures = [], []
    for r in rows:
        u, p = int(inter.users[r]), int(pos[r])
        requests.append(Case(u, seqs[u][:p], int(inter.items[r])))
        futures.append(seqs[u][p : p + future_len])
    return Replay(inter, cut, requests, futures)


@dataclass(frozen=True)
class Catalog:
    """What turns a model into a scorer over catalog codes: the champion's vocabulary."""

    vocab: ItemVocab
    item_ids: list[str]

    def scorer(self, model: Recommender) -> ModelScorer:
        model.eval()
        return ModelScorer(model, self.vocab, self.item_ids)


def train_champion(
    inter: Interactions, cut: int, epochs: int, seed: int
) -> tuple[Recommender, Catalog, list[Recommender]]:
    """The champion: a fresh model trained on every event before the cut; and a copy of it
    after each earlier epoch (less trained versions of the same run)."""
    cfg = StreamConfig().seeded(seed)
    states: list[dict[str, torch.Tensor]] = []

    def keep(epoch: int, model: Recommender, _vocab: ItemVocab) -> None:
        # Tensors only: building a model here would draw from torch's generator and change
        # the rest of the run (its dropout), so the champion would depend on the snapshots.
        if epoch + 1 < epochs:
            states.append(_cloned(model))

    model, vocab, _ = train_from_scratch(inter, np.arange(cut), cfg, epochs, keep)
    earlier = [Recommender.from_state(model.cfg, state) for state in states]
    return model, Catalog(vocab, inter.item_ids), earlier


def _cloned(model: Recommender) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def copy_of(model: Recommender) -> Recommender:
    """The same weights as a separate model object (no identity short-cut anywhere)."""
    return Recommender.from_state(model.cfg, _cloned(model))


def shuffled(model: Recommender, seed: int) -> Recommender:
    """The model with its item rows (1.., padding stays) in a seeded random order."""
    state = _cloned(model)
    table = state[TABLE]
    perm = 1 + np.random.default_rng(seed).permutation(table.shape[0] - 1)
    table[1:] = table[torch.from_numpy(perm)]
    return Recommender.from_state(model.cfg, state)


def noised(model: Recommender, scale: float, seed: int) -> Recommender:
    """Every float tensor plus Gaussian noise of ``scale`` x its RMS (one seeded draw: the same
    direction at every scale)."""
    gen = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    for k, v in model.state_dict().items():
        noise = torch.randn(v.shape, generator=gen)
        rms = float(v.float().pow(2).mean().sqrt())
        state[k] = v + scale * rms * noise if v.is_floating_point() else v.clone()
    return Recommender.from_state(model.cfg, state)


@dataclass(frozen=True)
class Scored:
    """One version on every request: NDCG@10 of the request's event, and its top-k answer."""

    ndcg: np.ndarray  # [R]
    top: np.ndarray  # [R, k] item codes, best first, seen items excluded

    @property
    def mean_ndcg(self) -> float:
        return float(self.ndcg.mean())


def score(scorer: ModelScorer, replay: Replay, k: int | None, batch: int = 512) -> Scored:
    """Rank every request once: the target's rank (NDCG@10) and the top ``k`` shown (``k``
    None: NDCG only, an empty ``top``, for tuning)."""
    ndcg: list[np.ndarray] = []
    top: list[np.ndarray] = [np.zeros((0, k or 0), dtype=np.int64)]
    for start in range(0, len(replay.requests), batch):
        part = replay.requests[start : start + batch]
        hist = [c.history for c in part]
        s = scorer.score(hist)
        targets = np.array([c.target for c in part], dtype=np.int64)
        ndcg.append(question_ndcg(rank_full(s, targets, hist), 10))
        if k is None:
            continue
        picked = top_k_rows(s, k, hist)
        if any(len(p) < k for p in picked):
            raise ValueError("a request has fewer than k items to recommend; lower k")
        top.append(np.stack([p.numpy() for p in picked]))
    return Scored(np.concatenate(ndcg), np.concatenate(top))


def relative_gap(base: float, other: float) -> float:
    """How much lower ``other`` is than ``base``, as a share of ``base``."""
    return 1.0 - other / base


@dataclass(frozen=True)
class Derived:
    """A weaker version of the champion and how much NDCG@10 it lost."""

    model: Recommender
    knob: float  # the noise scale, or the epoch it was trained to
    gap: float  # 1 - its NDCG@10 / the champion's


def tune_noise(model: Recommender, ndcg_of: Callable[[Recommender], float], target_gap: float,
               seed: int, tolerance: float = 0.005, steps: int = 12) -> Derived:  # fmt: skip
    """The noise scale (and its version) whose NDCG@10 is ``target_gap`` below ``model``'s,
    to within ``tolerance`` or the closest of ``steps`` bisections: bracket by doubling the
    scale, then bisect."""
    base = ndcg_of(model)

    def tried(scale: float) -> Derived:
        version = noised(model, scale, seed)
        return Derived(version, scale, relative_gap(base, ndcg_of(version)))

    lo, hi = 0.0, tried(0.05)
    while hi.gap < target_gap:
        if hi.knob > 64:
            raise RuntimeError(f"no noise scale up to {hi.knob} loses {target_gap:.0%} of NDCG@10")
        lo, hi = hi.knob, tried(2 * hi.knob)
    best = hi
    for _ in range(steps):
        if abs(best.gap - target_gap) <= tolerance:
            break
        mid = tried((lo + hi.knob) / 2)
        best = min(best, mid, key=lambda t: abs(t.gap - target_gap))
        lo, hi = (mid.knob, hi) if mid.gap < target_gap else (lo, mid)
    return best


def earlier_epoch(earlier: list[Recommender], gaps: list[float], target_gap: float,
                  gap_range: tuple[float, float]) -> Derived | None:  # fmt: skip
    """Of the less trained copies (``gaps``: their NDCG@10 loss against the champion), the one
    closest to ``target_gap`` among those inside ``gap_range``; None if none is."""
    inside = [i for i, g in enumerate(gaps) if gap_range[0] <= g <= gap_range[1]]
    if not inside:
        return None
    i = min(inside, key=lambda j: abs(gaps[j] - target_gap))
    return Derived(earlier[i], i + 1, gaps[i])


def paired_bootstrap(ndcg_a: np.ndarray, ndcg_b: np.ndarray, users: np.ndarray, resamples: int,
                     seed: int) -> float:  # fmt: skip
    """Two-sided p-value of "b's mean NDCG@10 differs from a's", resampling users (a user's
    requests together, since they share a history) with replacement."""
    _, idx = np.unique(users, return_inverse=True)
    diff = np.bincount(idx, weights=ndcg_b - ndcg_a)
    count = np.bincount(idx).astype(np.float64)
    n_users = len(count)
    rng = np.random.default_rng(seed)
    weights = rng.multinomial(n_users, np.full(n_users, 1.0 / n_users), size=resamples)
    stats = (weights @ diff) / (weights @ count)
    p = 2.0 * min(float(np.mean(stats <= 0.0)), float(np.mean(stats >= 0.0)))
    return min(1.0, p)
