"""Streaming (prequential, test-then-train) evaluation of continual-learning strategies.

Protocol
--------
The time-ordered events are cut into ``n_chunks`` chunks of equal event counts (``chunk_bounds``).
In every chunk, each user's *last* event of that chunk, if the user has an earlier event, is the
chunk's **holdout**; holdout events are never trained on by any strategy (they stay in users'
histories as context, as they would in production).

Round 0 pretrains on chunk 0. Then for every later chunk ``k``:

1. **test**: the current model predicts each event of chunk ``k`` from that user's whole earlier
   history (every event before it, across chunks), full ranking over the items the stream has
   seen before chunk ``k`` began, excluding the user's already-seen items except the target.
   Items first seen inside chunk ``k`` cannot be recommended by anyone, so they count as misses
   for every strategy alike. Events with no history are skipped. The mean is ``stream_ndcg10[k]``.
2. **train**: the strategy updates on chunk ``k``'s non-holdout events.
3. ``a[k][k]``: NDCG@10 on chunk ``k``'s holdout right after that round ("just learned").

After the last round ``F = n_chunks - 1`` every holdout is scored again: ``a[F][k]``.

Reported per strategy:

- ``stream_ndcg10`` = mean of ``stream_ndcg10[k]`` over k = 1..F (each chunk weighs the same).
- ``forgetting`` = mean over k = 0..F-1 of ``a[k][k] - a[F][k]``: how much NDCG@10 the final model
  lost on what earlier rounds had just learned (positive = forgot; negative = later rounds helped).
  The last chunk is left out because for it the two models coincide.
- ``train_s`` = mean wall-clock seconds of training per round k = 1..F (pretraining excluded,
  it is the same for all strategies).

Strategies (``ModelStrategy``, in ``harness.strategies``), all starting from the same model
pretrained on chunk 0 and all trained with the trainer's in-process loop (``training.fit.fit`` +
``torch_step``, one process, no Ray: this measures the learning strategy, not distribution):

- ``static``: never updates.
- ``finetune``: warm start, trains on the new chunk's events only (earlier events as context).
- ``replay``: like finetune plus ``replay.ratio`` x as many examples drawn from a
  ``training.replay.Reservoir`` of every earlier round's examples; then the new examples join it.
- ``replay_kd``: replay plus distillation from the model before the round, frozen with
  ``Recommender.frozen_teacher()`` and distilled by ``Recommender.loss`` exactly as the
  production round's Ray Train workers do (rows new this round left out of the KD term).
- ``full_retrain``: a fresh model (same seed) trained **from scratch** on every trainable event so
  far (the classic periodic batch retrain), tuned as the offline model is: each user's last event
  so far is held out for validation, training stops after ``patience`` epochs without a better
  validation NDCG@10 (at most ``full_epochs``) and the best epoch's weights are kept
  (``train_selected``). A fixed epoch count would flatter the cheaper strategies.

New items grow the item table as a production round grows it (``training.round.prepare_model``),
for every item of the new chunk, held-out events' included, as a production round's vocabulary
does: in ``id``, mean-of-known rows (the MiniLM title init, ``text_init``, is off in
``StreamConfig``'s model so that no strategy pays for it); with a text item representation
(``ModelConfig.item_repr``), the titles' MiniLM features.

The ``product`` strategy (the product's own rounds) is in ``harness.product_stream``; the
cold-item table's runs are in ``bench.cold_items``. Scores go through the one ranking core
(``training.ranking`` via ``training.evaluation``), the gate's.

Benchmark-only: production never imports this module (it lived in ``training/`` before).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from pydantic import BaseModel, ConfigDict, Field
from rich.table import Table

from training.config import ModelConfig, ReplayConfig, TrainerConfig
from training.evaluation import Case, Interactions, Scorer, ndcg_hr, rank_full

STRATEGIES = ("static", "finetune", "replay", "replay_kd", "full_retrain")


def _trainer() -> TrainerConfig:
    # Batch 32 at 5e-3 (from 128 at 2e-3): on MovieLens-100K, offline, 20 epochs, full-ranking
    # NDCG@10 0.0952/0.0950 vs 0.0862/0.0824 (seeds 0/1), in no more time per epoch on 2 cores.
    # Weight decay 0.01 is torch's AdamW default, which the in-process training has always used
    # (the product's rounds use TrainerConfig's 0.0); kept so that no earlier figure changes.
    # No warm-up, as these recipes were tuned (the rounds' half-epoch warm-up is for their few
    # steps from a converged champion).
    return TrainerConfig(batch_size=32, weight_decay=0.01, warmup_epochs=0.0)


def _replay() -> ReplayConfig:
    # The product's reservoir, with replay_kd's distillation on (the product's default is off).
    return ReplayConfig(kd_weight=0.5)


# The product settings the benchmark's in-process training reads (``harness.strategies``); the
# rest of TrainerConfig / ReplayConfig (workers, checkpoints, consolidation...) is Ray Train's
# round machinery, which the in-process strategies do not run, so records leave it out.
TRAINER_FIELDS = frozenset(
    {"batch_size", "lr", "lr_schedule", "warmup_epochs", "weight_decay", "seed"}
)
REPLAY_FIELDS = frozenset({"capacity", "ratio", "kd_weight", "kd_temperature", "seed"})


class StreamConfig(BaseModel):
    """How every strategy trains (one shared set of knobs, so only the strategy differs).

    The model, optimizer and reservoir settings are the product's own types (``ModelConfig``,
    ``TrainerConfig``, ``ReplayConfig``) with the values below; the fields after them are the
    benchmark's own schedule, which no product setting describes. Of ``trainer``, the in-process
    training reads ``TRAINER_FIELDS`` (the global batch is ``batch_size``: one process, no
    workers); of ``replay``, ``REPLAY_FIELDS``.
    """

    model_config = ConfigDict(extra="forbid")

    model: ModelConfig = Field(
        default_factory=lambda: ModelConfig(text_init=False), description="Model architecture."
    )
    trainer: TrainerConfig = Field(
        default_factory=_trainer,
        description="Optimizer, batch, learning-rate schedule and seed (model init, shuffles), "
        "every round.",
    )
    replay: ReplayConfig = Field(
        default_factory=_replay,
        description="Reservoir size, replayed examples per new one, distillation (replay_kd) "
        "and the reservoir's seed.",
    )
    # Validation NDCG@10 of the default model swings +-0.005 from epoch to epoch on ML-100K:
    # with 3, bench.quality stopped at epoch ~23 (0.1006 +- 0.0032); see bench/recipe_sweep.py.
    patience: int = Field(
        default=6,
        ge=1,
        description="Training from scratch stops after this many epochs without a better "
        "validation NDCG@10 (the best epoch's weights are kept).",
    )
    pretrain_epochs: int = Field(default=10, ge=1, description="Epochs on chunk 0 (shared).")
    update_epochs: int = Field(
        default=3, ge=1, description="Epochs per round for finetune, replay and replay_kd."
    )
    full_epochs: int = Field(
        default=10, ge=1, description="Epochs per round for full_retrain (from scratch)."
    )

    def seeded(self, seed: int) -> StreamConfig:
        """This config with ``seed`` for training and the reservoir alike (one seed per run)."""
        return self.model_copy(
            update={
                "trainer": self.trainer.model_copy(update={"seed": seed}),
                "replay": self.replay.model_copy(update={"seed": seed}),
            }
        )

    def record(self) -> dict[str, Any]:
        """The settings the strategies train with, for a results file (the model apart)."""
        return {
            "trainer": self.trainer.model_dump(mode="json", include=set(TRAINER_FIELDS)),
            "replay": self.replay.model_dump(mode="json", include=set(REPLAY_FIELDS)),
            **self.model_dump(mode="json", exclude={"model", "trainer", "replay"}),
        }


def chunk_bounds(n_events: int, n_chunks: int) -> list[tuple[int, int]]:
    """``[start, end)`` row ranges of ``n_chunks`` consecutive chunks as equal as possible."""
    if n_chunks < 2:
        raise ValueError(f"n_chunks={n_chunks}: streaming needs at least 2 chunks (pretrain + 1)")
    if n_events < n_chunks:
        raise ValueError(f"{n_events} events cannot fill {n_chunks} chunks; use fewer chunks")
    edges = np.linspace(0, n_events, n_chunks + 1).round().astype(int)
    return [(int(a), int(b)) for a, b in itertools.pairwise(edges)]


@dataclass(frozen=True)
class Chunk:
    """One chunk of the stream: its row range, rows to train on, and the two case lists."""

    index: int
    start: int
    end: int
    train_rows: np.ndarray
    holdout: list[Case]
    stream: list[Case]  # every event with a history, for the test-then-train score
    known_items: int  # item codes 1..known_items appeared before this chunk
    known_items_end: int  # ... before this chunk ended


def build_chunks(
    inter: Interactions, n_chunks: int, max_stream_cases: int | None = None, seed: int = 0
) -> list[Chunk]:
    """Cut ``inter`` into chunks with holdouts and stream cases (see the module docstring).

    ``max_stream_cases`` caps the test events per chunk with a seeded uniform subsample (the same
    events for every strategy) to bound evaluation time.
    """
    rng = np.random.default_rng(seed)
    n = len(inter.items)
    # position of each row inside its user's sequence, and that sequence, to slice histories
    by_user = inter.rows_by_user()
    seqs = [inter.items[rows] for rows in by_user]
    pos = np.empty(n, dtype=np.int64)
    for rows in by_user:
        pos[rows] = np.arange(len(rows))
    # item codes are given by first appearance, so a prefix maximum tells what is known so far
    seen_max = np.maximum.accumulate(inter.items)
    chunks: list[Chunk] = []
    for k, (start, end) in enumerate(chunk_bounds(n, n_chunks)):
        rows = np.arange(start, end)
        users = inter.users[rows]
        # last occurrence of each user inside the chunk: first occurrence in the reversed order
        _, last_rev = np.unique(users[::-1], return_index=True)
        last_rows = rows[len(rows) - 1 - last_rev]
        hold_rows = np.sort(last_rows[pos[last_rows] > 0])
        is_hold = np.zeros(n, dtype=bool)
        is_hold[hold_rows] = True
        stream_rows = rows[pos[rows] > 0]
        if max_stream_cases is not None and len(stream_rows) > max_stream_cases:
            stream_rows = np.sort(rng.choice(stream_rows, max_stream_cases, replace=False))

        def cases(sel: np.ndarray) -> list[Case]:
            return [
                Case(int(u), seqs[u][: pos[r]], int(inter.items[r]))
                for r, u in zip(sel, inter.users[sel], strict=True)
            ]

        known = int(seen_max[start - 1]) if start > 0 else 0
        chunks.append(
            Chunk(
                index=k,
                start=start,
                end=end,
                train_rows=rows[~is_hold[rows]],
                holdout=cases(hold_rows),
                stream=cases(stream_rows),
                known_items=known,
                known_items_end=int(seen_max[end - 1]),
            )
        )
    return chunks


def ranks_on(
    scorer: Scorer, cases: Sequence[Case], known_items: int, batch: int = 512
) -> np.ndarray:
    """Full-ranking 0-based ranks over items ``1..known_items`` (later items scored ``-inf``)."""
    ranks: list[np.ndarray] = [np.zeros(0, dtype=np.int64)]
    for start in range(0, len(cases), batch):
        part = cases[start : start + batch]
        scores = scorer.score([c.history for c in part])
        scores[:, known_items + 1 :] = -np.inf
        targets = np.array([c.target for c in part], dtype=np.int64)
        ranks.append(rank_full(scores, targets, [c.history for c in part]))
    return np.concatenate(ranks)


def ndcg_on(scorer: Scorer, cases: Sequence[Case], known_items: int, batch: int = 512) -> float:
    """Full-ranking NDCG@10 over items ``1..known_items`` (later items scored ``-inf``)."""
    return ndcg_hr(ranks_on(scorer, cases, known_items, batch))[0]


class Strategy(Protocol):
    """A continual-learning strategy: holds a model, learns from row sets, exposes a scorer."""

    name: str

    def update(
        self, rows: np.ndarray, seen_rows: np.ndarray, catalog_rows: np.ndarray | None = None
    ) -> None:
        """Learn from the new ``rows``; ``seen_rows`` = every trainable row so far (incl. rows);
        ``catalog_rows``: the rows whose items join the catalog now (default ``rows``)."""
        ...

    def scorer(self) -> Scorer: ...


@dataclass
class StrategyResult:
    name: str
    stream_ndcg10: list[float] = field(default_factory=list)  # chunks 1..F
    just_learned: list[float] = field(default_factory=list)  # a[k][k], k = 0..F
    just_learned_ranks: list[np.ndarray] = field(default_factory=list)  # their ranks, k = 0..F
    final: list[float] = field(default_factory=list)  # a[F][k], k = 0..F
    train_s: list[float] = field(default_factory=list)  # rounds 1..F

    @property
    def mean_stream_ndcg10(self) -> float:
        return float(np.mean(self.stream_ndcg10))

    @property
    def forgetting(self) -> float:
        drops = np.array(self.just_learned[:-1]) - np.array(self.final[:-1])
        drops = drops[~np.isnan(drops)]  # a chunk without holdout users has nothing to forget
        return float(drops.mean()) if drops.size else 0.0

    @property
    def mean_train_s(self) -> float:
        return float(np.mean(self.train_s))

    def summary(self) -> dict[str, float | list[float]]:
        return {
            "stream_ndcg10": round(self.mean_stream_ndcg10, 4),
            "forgetting": round(self.forgetting, 4),
            "train_s": round(self.mean_train_s, 2),
            "per_chunk_ndcg10": [round(x, 4) for x in self.stream_ndcg10],
        }


def run_stream(
    chunks: Sequence[Chunk],
    strategies: Sequence[Strategy],
    on_round: Callable[[int, StrategyResult], None] | None = None,
) -> list[StrategyResult]:
    """Test-then-train over ``chunks`` for each strategy (already pretrained on chunk 0)."""
    if len(chunks) < 2:
        raise ValueError("run_stream needs at least 2 chunks")
    results: list[StrategyResult] = []
    for strategy in strategies:
        res = StrategyResult(strategy.name)
        _just_learned(res, strategy.scorer(), chunks[0])
        seen = chunks[0].train_rows
        for chunk in chunks[1:]:
            res.stream_ndcg10.append(ndcg_on(strategy.scorer(), chunk.stream, chunk.known_items))
            seen = np.concatenate([seen, chunk.train_rows])
            t0 = time.perf_counter()
            # The chunk's held-out events' items join the catalog too, as in a production round
            # (their rows exist; they are just never trained on as targets).
            strategy.update(chunk.train_rows, seen, np.arange(chunk.start, chunk.end))
            res.train_s.append(time.perf_counter() - t0)
            _just_learned(res, strategy.scorer(), chunk)
            if on_round is not None:
                on_round(chunk.index, res)
        res.final = [_holdout_ndcg(strategy.scorer(), c) for c in chunks]
        results.append(res)
    return results


def _just_learned(res: StrategyResult, scorer: Scorer, chunk: Chunk) -> None:
    ranks = _holdout_ranks(scorer, chunk)
    res.just_learned_ranks.append(ranks)
    res.just_learned.append(_ndcg10(ranks))


def _holdout_ndcg(scorer: Scorer, chunk: Chunk) -> float:
    return _ndcg10(_holdout_ranks(scorer, chunk))


def _holdout_ranks(scorer: Scorer, chunk: Chunk) -> np.ndarray:
    # Scored after training on its chunk, so items first seen inside the chunk are candidates.
    return ranks_on(scorer, chunk.holdout, chunk.known_items_end)


def _ndcg10(ranks: np.ndarray) -> float:
    return ndcg_hr(ranks)[0] if ranks.size else float("nan")  # no held-out events: no score


def stream_table(results: Sequence[StrategyResult], title: str) -> Table:
    """One row per strategy: stream NDCG@10, forgetting, training seconds."""
    table = Table(title=title)
    table.add_column("strategy")
    for col in ("stream NDCG@10", "forgetting", "train s/round", "total train s"):
        table.add_column(col, justify="right")
    for r in results:
        table.add_row(
            r.name,
            f"{r.mean_stream_ndcg10:.4f}",
            f"{r.forgetting:+.4f}",
            f"{r.mean_train_s:.2f}",
            f"{sum(r.train_s):.1f}",
        )
    return table


def plot_stream(results: Sequence[StrategyResult], path: Path) -> Path:
    """NDCG@10 per chunk and training seconds per round, one line per strategy."""
    import matplotlib

    matplotlib.use("Agg")  # no display here; must precede pyplot's import
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for r in results:
        x = np.arange(1, len(r.stream_ndcg10) + 1)
        ax1.plot(x, r.stream_ndcg10, marker="o", label=r.name)
        ax2.plot(x, r.train_s, marker="o", label=r.name)
    ax1.set(xlabel="chunk", ylabel="NDCG@10 (test-then-train)", title="Streaming quality")
    ax2.set(xlabel="round", ylabel="seconds", title="Training time per round", yscale="log")
    ax1.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
