"""The recipe each version trains with, and how it comes to be: searched, fixed or inherited.

``choose`` runs in ``training.round.run_round`` between ``questions`` and ``train_candidate``:

- a lineage's first version (no champion) with ``tune.first_version`` searches its recipe
  (``training.tune.search``) on the round's own training examples, a validation question per user
  carved from them (``search_data``); the winner's architecture builds the cold-start model, its
  lr, batch and best epoch go into the round's ``TrainerConfig``, and the version is trained,
  gated and registered like any first version. A search that scores no trial falls back to the
  configured recipe (recorded with a note);
- a first version without the search records the configured recipe (source "fixed");
- a later version warm-starts from the champion, whose architecture it keeps; the champion's
  recipe's lr and batch apply unless the user set them (``model_fields_set``), and the version
  records the recipe as "inherited from vN".

The record (``RecipeRecord``) is kept in the version's meta under ``RECIPE_KEY``; the round reads
it back from the champion's meta (``LoadedVersion.meta``, through the registry).
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from pydantic import Field

from streams.config_base import StrictConfig
from training.config import ModelConfig, TrainerConfig
from training.data import round_examples
from training.errors import TrainingError
from training.round_config import RoundConfig
from training.round_train import prepare_model

if TYPE_CHECKING:
    from training.histories import UserHistories
    from training.round_steps import Plan, RoundExamples
    from training.tune import SearchData
    from training.tune_result import SearchResult
    from training.vocab import ItemVocab

log = logging.getLogger(__name__)

RECIPE_KEY = "recipe"  # the version's meta key
# What a later round takes from the champion's recipe (its architecture comes with its weights).
INHERITED = ("lr", "batch_size")


class RecipeError(TrainingError):
    """A version's recorded recipe cannot be read or applied."""


class RecipeModel(StrictConfig):
    """The architecture fields the search chooses among."""

    d_model: int
    n_layers: int
    n_heads: int
    dropout: float
    num_negatives: int


class RecipeTrainer(StrictConfig):
    """The trainer fields the search chooses (the round's per-worker terms, and the global batch
    the search trained with: one process, no workers)."""

    lr: float
    batch_size: int = Field(description="Per Ray Train worker, as TrainerConfig.batch_size.")
    global_batch_size: int = Field(description="batch_size x num_workers: the search's batch.")
    first_round_epochs: int


class SearchSummary(StrictConfig):
    trials: int
    unstarted: int
    winner: str
    best_valid_ndcg10: float | None
    best_epoch: int | None
    seconds: float
    cpu_s: float
    budget_cpu_s: float
    table: str = Field(description="The saved table of trials (search.json).")


class RecipeRecord(StrictConfig):
    """What a version's meta says about the recipe it was trained with."""

    source: str = Field(pattern=r"^(fixed|searched|inherited from v\d+)$")
    origin: Literal["fixed", "searched"] = Field(description="How the lineage's recipe began.")
    origin_version: int | None = Field(
        default=None, description="The version it began with; None: this version."
    )
    model: RecipeModel
    trainer: RecipeTrainer
    explicit: list[str] = Field(
        default_factory=list,
        description="Inheritable fields the user's settings kept instead of the champion's.",
    )
    search: SearchSummary | None = None
    note: str | None = None

    @classmethod
    def of(cls, mcfg: ModelConfig, tcfg: TrainerConfig, **kw: Any) -> RecipeRecord:
        model = RecipeModel(d_model=mcfg.d_model, n_layers=mcfg.n_layers, n_heads=mcfg.n_heads,
                            dropout=mcfg.dropout, num_negatives=mcfg.num_negatives)  # fmt: skip
        trainer = RecipeTrainer(
            lr=tcfg.lr,
            batch_size=tcfg.batch_size,
            global_batch_size=tcfg.batch_size * tcfg.num_workers,
            first_round_epochs=tcfg.first_round_epochs,
        )
        return cls(model=model, trainer=trainer, **kw)


@dataclass(frozen=True)
class Chosen:
    """The round as it trains: its plan and settings with the recipe applied, and the record."""

    plan: Plan
    cfg: RoundConfig
    record: RecipeRecord
    search_s: float = 0.0


def per_worker(global_batch: int, num_workers: int) -> int:
    return max(1, round(global_batch / num_workers))


def fixed(cfg: RoundConfig, mcfg: ModelConfig, note: str | None = None) -> RecipeRecord:
    """The configured recipe, as a first version without a search trains with it."""
    return RecipeRecord.of(mcfg, cfg.trainer, source="fixed", origin="fixed", note=note)


def searched(
    cfg: RoundConfig, result: SearchResult, table: str
) -> tuple[RoundConfig, RecipeRecord]:
    """``cfg`` with the winning recipe: its architecture, lr, batch and best epoch."""
    best = result.best
    trainer = cfg.trainer.model_copy(update={
        "lr": result.trainer.lr,
        "batch_size": per_worker(result.trainer.batch_size, cfg.trainer.num_workers),
        # Training stops where validation peaked in the search (its patience ended the trial).
        "first_round_epochs": best.best_epoch or cfg.trainer.first_round_epochs,
    })  # fmt: skip
    # Only the searched fields: the search also reseeds its trainer, which the round must not.
    arch = RecipeModel.model_fields
    model = ModelConfig.model_validate(
        {**cfg.model.model_dump(), **{k: getattr(result.model, k) for k in arch}}
    )
    out = cfg.model_copy(update={"model": model, "trainer": trainer})
    summary = SearchSummary(
        trials=len(result.trials), unstarted=result.unstarted, winner=best.trial_id,
        best_valid_ndcg10=best.best_valid_ndcg10, best_epoch=best.best_epoch,
        seconds=round(result.seconds, 1), cpu_s=round(result.cpu_s, 1),
        budget_cpu_s=round(result.budget_cpu_s, 1), table=table,
    )  # fmt: skip
    record = RecipeRecord.of(model, trainer, source="searched", origin="searched", search=summary)
    return out, record


def inherited(
    cfg: RoundConfig, mcfg: ModelConfig, champ_v: int, champ_meta: dict[str, Any]
) -> tuple[RoundConfig, RecipeRecord]:
    """``cfg`` with the champion's recipe's lr and batch, unless the user set them; ``mcfg`` is
    the champion's own architecture (it warm-starts from its weights)."""
    raw = champ_meta.get(RECIPE_KEY)
    if raw is None:  # a champion registered before versions recorded their recipe
        note = f"v{champ_v} recorded no recipe: the configured lr and batch apply"
        return cfg, fixed(cfg, mcfg, note)
    try:
        parent = RecipeRecord.model_validate(raw)
    except ValueError as err:
        raise RecipeError(f"v{champ_v}'s recorded recipe cannot be read: {err}") from err
    explicit = [f for f in INHERITED if f in cfg.trainer.model_fields_set]
    update: dict[str, Any] = {}
    if "lr" not in explicit:
        update["lr"] = parent.trainer.lr
    if "batch_size" not in explicit:  # the global batch: the number of workers may have changed
        update["batch_size"] = per_worker(parent.trainer.global_batch_size,
                                          cfg.trainer.num_workers)  # fmt: skip
    trainer = cfg.trainer.model_copy(update=update)
    record = RecipeRecord.of(
        mcfg, trainer.model_copy(update={"first_round_epochs": parent.trainer.first_round_epochs}),
        source=f"inherited from v{champ_v}", origin=parent.origin,
        origin_version=parent.origin_version if parent.origin_version is not None else champ_v,
        explicit=explicit, search=parent.search,
    )  # fmt: skip
    return cfg.model_copy(update={"trainer": trainer}), record


def search_data(
    ex: RoundExamples,
    history: UserHistories,
    vocab: ItemVocab,
    titles: dict[str, str],
    max_len: int,
) -> SearchData:
    """What the search of a first round sees: the round's training events only (the gate's
    held-out questions are cut off first), with each user's last training event as the
    validation question and the events before it as training examples."""
    from training.tune import SearchData, SearchError

    # The gate's questions per user (``round_examples`` numbers users in ``new_seqs``'s order).
    asked = ex.new_hold.users if ex.new_hold.users is not None else np.zeros(0, dtype=np.int64)
    held = np.bincount(asked, minlength=len(ex.new_seqs))
    train = {u: rows[: len(rows) - int(held[k])] for k, (u, rows) in enumerate(ex.new_seqs.items())}
    examples, valid = round_examples(history.recent, train, max_len, 1, seen=history.seen)
    if len(examples) == 0 or len(valid) == 0:
        raise SearchError("the round's training events give the search no examples or questions")
    hists = [h[h > 0] for h in valid.histories]
    events = int((examples.targets != 0).sum())
    return SearchData(vocab, examples, hists, valid.targets.copy(), events, dict(titles))


def _search(p: Plan, ex: RoundExamples, cfg: RoundConfig) -> Chosen:
    from training.tune import SearchError, search

    t0 = time.monotonic()
    # The search compares global batches (one process); the round's batch is per worker.
    trainer = cfg.trainer.model_copy(
        update={"batch_size": cfg.trainer.batch_size * cfg.trainer.num_workers}
    )
    name = f"first-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    try:
        data = search_data(ex, p.history, p.state.vocab, p.state.titles, p.mcfg.max_len)
        result = search(data, p.mcfg, trainer, cfg.tune, name=name)
    except SearchError as err:  # the configured recipe still makes a first version
        log.warning("recipe search failed, the first version trains the configured recipe: %s",
                    err)  # fmt: skip
        note = f"search failed: {err}"
        return Chosen(p, cfg, fixed(cfg, p.mcfg, note), time.monotonic() - t0)
    table = str(result.save())
    out, record = searched(cfg, result, table)
    log.info("recipe search: %d trials in %.0f s, winner %s (valid NDCG@10 %.4f); table %s",
             len(result.trials), result.seconds, result.best.recipe,
             result.best.best_valid_ndcg10 or 0.0, table)  # fmt: skip
    # A cold start in the winning architecture: the plan's model was built for the configured one.
    init = prepare_model(None, p.state.vocab, out.model, p.state.titles, [])
    return Chosen(replace(p, mcfg=out.model, init=init), out, record, time.monotonic() - t0)


def choose(p: Plan, ex: RoundExamples, cfg: RoundConfig) -> Chosen:
    """The recipe this round trains with (see the module docstring)."""
    champ = p.state.champion
    if champ is not None:
        assert p.champ_v is not None
        out, record = inherited(cfg, p.mcfg, p.champ_v, champ.meta)
        return Chosen(p, out, record)
    if cfg.tune.first_version:
        return _search(p, ex, cfg)
    return Chosen(p, cfg, fixed(cfg, p.mcfg))
