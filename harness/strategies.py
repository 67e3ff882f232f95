"""How each strategy of the streaming evaluation trains (``harness.prequential`` runs them).

``ModelStrategy`` is one strategy's lineage (model, vocab, replay reservoir) and its update per
round; ``train_selected`` trains from scratch with the epoch chosen on validation, for the
offline model and the streaming full retrain alike. All of it trains with the trainer's
in-process loop (``training.fit``), one process, no Ray: it measures the learning strategy, not
distribution. Benchmark-only: production never imports this module.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from harness.prequential import STRATEGIES, StreamConfig, ndcg_on
from training import rows
from training.data import Examples, round_examples
from training.evaluation import Case, Interactions, ModelScorer, Scorer
from training.fit import LrSchedule, fit, torch_step
from training.model import Recommender
from training.replay import Reservoir
from training.round import prepare_model
from training.vocab import ItemVocab


def sequences(inter: Interactions, rows: np.ndarray, vocab: ItemVocab) -> dict[str, list[int]]:
    """user id -> vocab rows of ``rows`` (row indices); items the vocab lacks are dropped."""
    out: dict[str, list[int]] = {}
    for r in np.sort(rows):
        row = vocab.index(inter.item_ids[inter.items[r] - 1])
        if row is not None:
            out.setdefault(inter.user_ids[inter.users[r]], []).append(row)
    return out


def vocab_of(inter: Interactions, rows: np.ndarray, vocab: ItemVocab | None = None) -> ItemVocab:
    """``vocab`` (or a new one) extended with the items of ``rows`` in time order."""
    vocab = ItemVocab() if vocab is None else vocab
    vocab.add(inter.item_ids[c - 1] for c in inter.items[np.sort(rows)])
    return vocab


def item_titles(inter: Interactions) -> dict[str, str]:
    """item id -> its text (``item_text``: MovieLens titles), for items that have one."""
    if "item_text" not in inter.table.column_names:
        return {}
    ids = inter.table.column("item_id").to_pylist()
    texts = inter.table.column("item_text").to_pylist()
    return {i: t for i, t in zip(ids, texts, strict=True) if t}


def train_fit(
    model: Recommender,
    examples: Examples,
    cfg: StreamConfig,
    epochs: int,
    seed: int,
    teacher: Recommender | None = None,
    on_epoch: Callable[[int, dict[str, float]], bool | None] | None = None,
) -> None:
    """``training.fit`` with the recipe's optimizer and learning-rate schedule (as the workers)."""
    tcfg, rcfg = cfg.trainer, cfg.replay
    distils = teacher is not None and rcfg.kd_weight > 0
    opt, table = rows.optimizers(model, tcfg, distils)
    schedule = LrSchedule.for_run(
        tcfg.lr, len(examples), tcfg.batch_size, epochs, tcfg.warmup_epochs, tcfg.lr_schedule
    )
    fit(
        model,
        examples,
        torch_step(model, tcfg.lr, opt=opt, table=table),
        epochs,
        tcfg.batch_size,
        seed=seed,
        teacher=teacher,
        kd_weight=rcfg.kd_weight if teacher is not None else 0.0,
        kd_temperature=rcfg.kd_temperature,
        on_epoch=on_epoch,
        schedule=schedule,
        optimizer=opt,
    )


def train_from_scratch(
    inter: Interactions,
    rows: np.ndarray,
    cfg: StreamConfig,
    epochs: int,
    on_epoch: Callable[[int, Recommender, ItemVocab], bool | None] | None = None,
) -> tuple[Recommender, ItemVocab, Examples]:
    """A fresh model (seeded) trained on ``rows``; ``on_epoch`` sees the model after each epoch
    and stops training by returning True."""
    vocab = vocab_of(inter, rows)
    torch.manual_seed(cfg.trainer.seed)
    model = prepare_model(None, vocab, cfg.model, item_titles(inter), [])
    examples, _ = round_examples({}, sequences(inter, rows, vocab), cfg.model.max_len, False)
    hook = None if on_epoch is None else (lambda e, _m: on_epoch(e, model, vocab))
    train_fit(model, examples, cfg, epochs, cfg.trainer.seed, on_epoch=hook)
    return model, vocab, examples


@dataclass
class Selected:
    """A model trained from scratch with its epoch chosen on validation."""

    model: Recommender
    vocab: ItemVocab
    examples: Examples
    best_epoch: int
    epochs_run: int
    valid_ndcg10: float


def train_selected(
    inter: Interactions,
    rows: np.ndarray,
    valid: Sequence[Case],
    cfg: StreamConfig,
    max_epochs: int,
    on_epoch: Callable[[int, float], None] | None = None,
) -> Selected:
    """From scratch on ``rows`` for at most ``max_epochs``, scored after every epoch on ``valid``
    (full-ranking NDCG@10); stops after ``cfg.patience`` epochs without a better score and keeps
    the best epoch's weights. The offline model and the streaming full retrain both use it, so
    neither is compared at a fixed, possibly unlucky, epoch count."""
    best_score, best_epoch, epochs_run = -1.0, 0, 0
    state: dict[str, torch.Tensor] | None = None

    def pick(epoch: int, model: Recommender, vocab: ItemVocab) -> bool:
        nonlocal best_score, best_epoch, epochs_run, state
        epochs_run = epoch + 1
        score = ndcg_on(ModelScorer(model, vocab, inter.item_ids), valid, inter.n_items)
        if on_epoch is not None:
            on_epoch(epoch, score)
        if score > best_score:
            best_score, best_epoch = score, epoch + 1
            state = copy.deepcopy(model.state_dict())
        return epochs_run - best_epoch >= cfg.patience

    model, vocab, examples = train_from_scratch(inter, rows, cfg, max_epochs, pick)
    if state is not None:
        model = Recommender.from_state(model.cfg, state)
    return Selected(model, vocab, examples, best_epoch, epochs_run, best_score)


def last_event_split(inter: Interactions, rows: np.ndarray) -> tuple[np.ndarray, list[Case]]:
    """Each user's last event among ``rows`` as a validation case (users with >= 3 of them;
    history = their earlier rows), and the remaining rows to train on."""
    rows = np.sort(rows)
    users = inter.users[rows]
    valid: list[Case] = []
    keep = np.ones(len(rows), dtype=bool)
    order = np.argsort(users, kind="stable")
    bounds = np.flatnonzero(np.diff(users[order])) + 1
    for group in np.split(order, bounds):
        if len(group) < 3:
            continue
        keep[group[-1]] = False
        seq = inter.items[rows[group]]
        valid.append(Case(int(users[group[-1]]), seq[:-1], int(seq[-1])))
    return rows[keep], valid


class ModelStrategy:
    """One strategy's lineage: model, vocab and (for replay) its reservoir."""

    def __init__(
        self,
        name: str,
        inter: Interactions,
        cfg: StreamConfig,
        pretrained: tuple[Recommender, ItemVocab, Examples],
    ) -> None:
        if name not in STRATEGIES:
            raise ValueError(f"unknown strategy {name!r}; choose among {', '.join(STRATEGIES)}")
        self.name, self.inter, self.cfg = name, inter, cfg
        self.titles = item_titles(inter)  # what a round's new items are grown from
        model, vocab, examples = pretrained
        self.model = Recommender.from_state(model.cfg, model.state_dict())
        self.vocab = ItemVocab(vocab.items())
        self.reservoir = Reservoir(cfg.replay.capacity, cfg.model.max_len, cfg.replay.seed)
        if name.startswith("replay"):
            self.reservoir.add(examples)
        self.rounds = 0
        self.best_epochs: list[int] = []  # full_retrain: the epoch validation chose, per round

    def scorer(self) -> Scorer:
        return ModelScorer(self.model, self.vocab, self.inter.item_ids)

    def update(
        self, rows: np.ndarray, seen_rows: np.ndarray, catalog_rows: np.ndarray | None = None
    ) -> None:
        self.rounds += 1
        cfg = self.cfg
        seed = (
            cfg.trainer.seed + 1000 * self.rounds
        )  # a different shuffle every round, reproducibly
        if self.name == "static":
            return
        if self.name == "full_retrain":
            train_rows, valid = last_event_split(self.inter, seen_rows)
            chosen = train_selected(self.inter, train_rows, valid, cfg, cfg.full_epochs)
            self.model, self.vocab = chosen.model, chosen.vocab
            self.best_epochs.append(chosen.best_epoch)
            return
        teacher = self.model.frozen_teacher() if self.name == "replay_kd" else None
        old_rows = len(self.vocab)
        vocab_of(self.inter, rows, self.vocab)
        if catalog_rows is not None:
            vocab_of(self.inter, catalog_rows, self.vocab)
        # A production round's growth: title features (text modes) or the title init (id).
        added = self.vocab.items()[old_rows - 1 :]
        self.model = prepare_model(self.model, self.vocab, self.model.cfg, self.titles, added)
        new_users = np.isin(self.inter.users, np.unique(self.inter.users[rows]))
        context_rows = np.setdiff1d(seen_rows, rows)
        context_rows = context_rows[new_users[context_rows]]
        new_ex, _ = round_examples(
            sequences(self.inter, context_rows, self.vocab),
            sequences(self.inter, rows, self.vocab),
            cfg.model.max_len,
            False,
        )
        train_ex = new_ex
        if self.name.startswith("replay"):
            train_ex = new_ex.concat(self.reservoir.sample(int(cfg.replay.ratio * len(new_ex))))
            self.reservoir.add(new_ex)
        train_fit(self.model, train_ex, cfg, cfg.update_epochs, seed, teacher=teacher)
