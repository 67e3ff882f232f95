"""The first version's recipe search: Ray Tune over ``training.tune_space``, ASHA early stopping.

Public API
----------
- ``SearchData.from_split(inter, train_rows, valid, max_len)``: everything a search may see, the
  training rows as examples and the validation questions. It has no place for test questions or
  later events, so nothing past validation can choose a recipe (no leak by construction).
- ``run_trial(recipe, data, ...)``: one recipe trained from scratch in this process, scored on
  validation (full-ranking NDCG@10) after every epoch, stopped after ``patience`` epochs without
  a better score; the unit every Tune trial runs and the tests call directly.
- ``search(data, model, trainer, cfg)``: Tuner + ASHAScheduler within ``cfg``'s CPU budget; returns
  ``SearchResult`` (the winning recipe as ModelConfig + TrainerConfig, one row per trial) and
  keeps the winner's best-epoch weights (``load_winner``), so the winner is itself a model
  trained to its validation optimum: no second training is needed.

Trials run in-process torch (one thread each, ``cfg.cpus`` side by side), not Ray Train: a
trial is a few seconds to a minute of a width-32 model, which DeepSpeed's set-up would dominate.
"""

from __future__ import annotations

import copy
import logging
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file

from training import rows
from training.config import ModelConfig, TrainerConfig, TuneConfig
from training.data import Examples, left_pad, round_examples
from training.errors import TrainingError
from training.evaluation import Case, Interactions
from training.fit import LrSchedule, fit, torch_step
from training.model import Recommender
from training.ranking import ndcg_hr, rank_full, score_batch
from training.round_train import prepare_model
from training.tune_result import METRIC, CpuBudget, SearchResult, trial_row
from training.tune_space import Recipe, search_space
from training.vocab import ItemVocab

WEIGHTS = "model.safetensors"
log = logging.getLogger(__name__)
Report = Callable[[dict[str, float], dict[str, torch.Tensor] | None], None]


class _FrequentSnapshots(logging.Filter):
    """Drops Tune's warning that it snapshots its state often: each trial's improving epoch is a
    checkpoint, and with ``num_to_keep=1`` each forces a snapshot of a small local folder; on a
    large data set it was most of a search's log. Tune's warning of a slow snapshot stays."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Experiment state snapshotting")


_FREQUENT_SNAPSHOTS = _FrequentSnapshots()  # one instance: adding it again is a no-op


def quiet_tune_logs() -> None:
    """Tune's warnings that say nothing about a search here, out of its log."""
    logging.getLogger("ray.tune.execution.experiment_state").addFilter(_FREQUENT_SNAPSHOTS)
    # Trials the budget never started have no results: Tune warns once per trial.
    logging.getLogger("ray.tune.analysis.experiment_analysis").setLevel(logging.ERROR)


class SearchError(TrainingError):
    """The recipe search could not run or produced no scored trial."""


@dataclass(frozen=True)
class SearchData:
    """Training examples and validation questions in vocab rows; nothing else."""

    vocab: ItemVocab
    examples: Examples
    valid_histories: list[np.ndarray]
    valid_targets: np.ndarray  # 0 = an item training never saw: always a miss
    events: int
    titles: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_split(
        cls,
        inter: Interactions,
        train_rows: np.ndarray,
        valid: Sequence[Case],
        max_len: int,
        titles: dict[str, str] | None = None,
    ) -> SearchData:
        rows = np.sort(train_rows)
        vocab = ItemVocab(inter.item_ids[c - 1] for c in inter.items[rows])
        code_to_row = np.array(
            [0, *((vocab.index(i) or 0) for i in inter.item_ids)], dtype=np.int64
        )
        seqs: dict[str, list[int]] = {}
        for r in rows:
            seqs.setdefault(inter.user_ids[inter.users[r]], []).append(
                int(code_to_row[inter.items[r]])
            )
        examples, _ = round_examples({}, seqs, max_len, 0)
        if len(examples) == 0 or not valid:
            raise SearchError("the search needs training examples and validation questions")
        hists = [code_to_row[c.history][code_to_row[c.history] > 0] for c in valid]
        targets = code_to_row[np.array([c.target for c in valid], dtype=np.int64)]
        return cls(vocab, examples, hists, targets, len(rows), titles or {})

    def ndcg10(self, model: Recommender, batch: int = 512) -> float:
        """Full-ranking NDCG@10 on validation, seen items excluded (``bench.quality``'s own)."""
        model.eval()
        ranks = []
        batch = score_batch(batch, model.n_rows)
        with torch.no_grad():
            for s in range(0, len(self.valid_histories), batch):
                hists = self.valid_histories[s : s + batch]
                x = np.stack([left_pad(h.tolist(), model.cfg.max_len) for h in hists])
                scores = model.score(torch.from_numpy(x)).float().numpy()
                ranks.append(rank_full(scores, self.valid_targets[s : s + batch], hists))
        return ndcg_hr(np.concatenate(ranks))[0]


@dataclass(frozen=True)
class TrialOutcome:
    best_valid_ndcg10: float
    best_epoch: int
    epochs: int
    seconds: float
    state: dict[str, torch.Tensor] | None


def run_trial(
    recipe: Recipe,
    data: SearchData,
    model_cfg: ModelConfig,
    trainer: TrainerConfig,
    max_epochs: int,
    patience: int,
    report: Report | None = None,
) -> TrialOutcome:
    """Train ``recipe`` from scratch (seeded by ``trainer.seed``); ``report`` gets every epoch's
    metrics, and the weights whenever validation improved."""
    mcfg, tcfg = recipe.apply(model_cfg, trainer)
    torch.manual_seed(tcfg.seed)
    model = prepare_model(None, data.vocab, mcfg, data.titles, [])
    opt, table = rows.optimizers(model, tcfg)
    n = len(data.examples)
    schedule = LrSchedule.for_run(
        tcfg.lr, n, tcfg.batch_size, max_epochs, tcfg.warmup_epochs, tcfg.lr_schedule
    )
    best, best_epoch, epochs, t0, c0 = -1.0, 0, 0, time.perf_counter(), time.process_time()
    state: dict[str, torch.Tensor] | None = None

    def on_epoch(epoch: int, _stats: dict[str, float]) -> bool:
        nonlocal best, best_epoch, epochs, state
        epochs = epoch + 1
        score = data.ndcg10(model)
        improved = score > best
        if improved:
            best, best_epoch = score, epochs
            state = copy.deepcopy(model.state_dict())
        if report is not None:
            metrics = {"valid_ndcg10": score, METRIC: best, "best_epoch": float(best_epoch),
                       "cpu_s": time.process_time() - c0}  # fmt: skip
            report(metrics, state if improved else None)
        return epochs - best_epoch >= patience

    step = torch_step(model, tcfg.lr, opt=opt, table=table)
    fit(model, data.examples, step, max_epochs, tcfg.batch_size, seed=tcfg.seed,
        on_epoch=on_epoch, schedule=schedule, optimizer=opt)  # fmt: skip
    return TrialOutcome(best, best_epoch, epochs, time.perf_counter() - t0, state)


def _trainable(
    config: dict[str, Any],
    data: SearchData,
    model_cfg: ModelConfig,
    trainer: TrainerConfig,
    cfg: TuneConfig,
) -> None:
    from ray import tune

    # One thread per trial: trials share the machine's cores side by side.
    torch.set_num_threads(1)

    def report(metrics: dict[str, float], state: dict[str, torch.Tensor] | None) -> None:
        if state is None:
            tune.report(metrics)
            return
        with tempfile.TemporaryDirectory() as tmp:
            tensors = {k: v.detach().contiguous() for k, v in state.items()}
            save_file(tensors, str(Path(tmp) / WEIGHTS))
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(tmp))

    recipe = Recipe.model_validate(config)
    run_trial(recipe, data, model_cfg, trainer, cfg.max_epochs, cfg.patience, report)


def trial_resources(trainer: TrainerConfig) -> dict[str, float]:
    """A trial's Ray resources: one CPU, on a training node when ``trainer.node_resource`` names
    them, as a round's task and workers are (a search on a cluster must not train on the serving
    nodes). Tune takes keys other than cpu, gpu and memory as custom resources."""
    return {"cpu": 1.0, **trainer.on_training_nodes()}


def load_winner(result: SearchResult) -> Recommender:
    """The winning trial's weights at its best validation epoch."""
    if result.best.checkpoint is None:
        raise SearchError(f"trial {result.best.trial_id} kept no weights")
    return Recommender.from_file(Path(result.best.checkpoint) / WEIGHTS, result.model)


def epoch_cpu_s(
    data: SearchData, model_cfg: ModelConfig, trainer: TrainerConfig, sample: int = 4096
) -> float:
    """CPU seconds of one epoch of the fixed recipe on ``data`` at one thread (as a trial runs),
    its validation included: one epoch over a seeded sample of ``sample`` examples and the same
    share of the validation questions, scaled up to the whole."""
    share = min(1.0, sample / len(data.examples))
    rng = np.random.default_rng(0)
    picked = np.sort(rng.choice(len(data.examples), max(1, round(share * len(data.examples))),
                                replace=False))  # fmt: skip
    questions = max(1, round(share * len(data.valid_histories)))
    part = replace(data, examples=data.examples.take(picked),
                   valid_histories=data.valid_histories[:questions],
                   valid_targets=data.valid_targets[:questions])  # fmt: skip
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        c0 = time.process_time()
        run_trial(Recipe.of(model_cfg, trainer), part, model_cfg, trainer, 1, 1)
        spent = time.process_time() - c0
    finally:
        torch.set_num_threads(threads)
    log.info("one epoch of the fixed recipe: ~%.1f CPU s (timed on %.1f%% of the data)",
             spent / share, 100 * share)  # fmt: skip
    return spent / share


def _start_ray(cpus: int) -> bool:
    """A local Ray of ``cpus`` CPUs unless this process is already connected; True if started."""
    import ray

    if ray.is_initialized():
        return False
    # address="local": never join a cluster another process started on this machine (`up`'s).
    ray.init(address="local", num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    return True


def search(
    data: SearchData,
    model_cfg: ModelConfig,
    trainer: TrainerConfig,
    cfg: TuneConfig,
    name: str | None = None,
) -> SearchResult:
    """Sample recipes (today's first), train them side by side, cut the weak ones at ASHA's
    rungs, stop at the budget; the winner is the best validation NDCG@10 of any trial."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search import BasicVariantGenerator

    n_items = len(data.vocab) - 1
    first = Recipe.of(model_cfg, trainer).model_dump(exclude_none=True)
    space = search_space(model_cfg, n_items)
    if "num_negatives" in space:
        first["num_negatives"] = model_cfg.num_negatives
    trainer = trainer.model_copy(update={"seed": cfg.seed})
    epoch_s = epoch_cpu_s(data, model_cfg, trainer) if cfg.budget_cpu_minutes is None else None
    budget = cfg.budget_cpu_s(epoch_s)
    name = name or time.strftime("search-%Y%m%d-%H%M%S")
    quiet_tune_logs()
    started = _start_ray(cfg.cpus)
    t0 = time.perf_counter()
    try:
        tuner = tune.Tuner(
            tune.with_resources(
                tune.with_parameters(
                    _trainable, data=data, model_cfg=model_cfg, trainer=trainer, cfg=cfg
                ),
                trial_resources(trainer),
            ),
            param_space=space,
            tune_config=tune.TuneConfig(
                metric=METRIC,
                mode="max",
                search_alg=BasicVariantGenerator(points_to_evaluate=[first], random_state=cfg.seed),
                scheduler=ASHAScheduler(
                    max_t=cfg.max_epochs,
                    grace_period=cfg.grace_epochs,
                    reduction_factor=cfg.reduction_factor,
                ),
                num_samples=cfg.max_trials,
                max_concurrent_trials=cfg.cpus,
                time_budget_s=cfg.wall_limit_s(budget),
                reuse_actors=True,
            ),
            run_config=tune.RunConfig(
                name=name,
                storage_path=str(cfg.storage_path.resolve()),
                checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
                stop=CpuBudget(budget),
                verbose=0,
            ),
        )
        grid = tuner.fit()
    finally:
        if started:
            import ray

            ray.shutdown()
    # Trials the budget ended before they started have no config or metrics: not in the table.
    results = [grid[i] for i in range(len(grid))]
    rows = [trial_row(res) for res in results if res.config and res.metrics]
    scored = [r for r in rows if r.best_valid_ndcg10 is not None]
    if not scored:
        raise SearchError(f"no trial finished an epoch within {budget:.0f} CPU s; raise the budget")
    best = max(scored, key=lambda r: r.best_valid_ndcg10 or 0.0)
    recipe = Recipe.model_validate(best.recipe)
    m, t = recipe.apply(model_cfg, trainer)
    path = cfg.storage_path.resolve() / name
    return SearchResult(best, m, t, rows, budget, time.perf_counter() - t0, path,
                        len(results) - len(rows))  # fmt: skip


def search_events(
    table: Any,
    model_cfg: ModelConfig,
    trainer: TrainerConfig,
    cfg: TuneConfig,
    first: int | None = None,
    name: str | None = None,
) -> SearchResult:
    """``search`` on a buffer-shaped Arrow table's first ``first`` events (all by default), split
    as ``bench.tune`` splits: each user's second last event validates, earlier ones train, and
    the last is left out; nothing after the first ``first`` events is read."""
    from training.evaluation import encode, leave_one_out

    if first is not None:
        table = table.slice(0, first)
    inter = encode(table)
    split = leave_one_out(inter)
    # leave_one_out's own test questions (each user's last event) are not handed on: validation
    # is every user's second last, and the last trains neither the search nor its winner.
    titles: dict[str, str] = {}
    if "item_text" in table.column_names:
        ids, texts = table.column("item_id").to_pylist(), table.column("item_text").to_pylist()
        titles = {i: t for i, t in zip(ids, texts, strict=True) if t}
    data = SearchData.from_split(inter, split.train_rows, split.valid, model_cfg.max_len, titles)
    return search(data, model_cfg, trainer, cfg, name=name)
