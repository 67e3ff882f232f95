"""The first version's recipe search (training.tune): small synthetic data, a few tiny trials."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from tests.training.data_gen import synthetic_table
from training.config import ModelConfig, TrainerConfig, TuneConfig
from training.evaluation import Interactions, encode, leave_one_out
from training.tune import (
    SearchData,
    SearchError,
    epoch_cpu_s,
    load_winner,
    quiet_tune_logs,
    run_trial,
    search,
    trial_resources,
)
from training.tune_space import Recipe, search_space

MODEL = ModelConfig(max_len=20, text_init=False)
TRAINER = TrainerConfig(batch_size=32)


@pytest.fixture(scope="module")
def inter() -> Interactions:
    return encode(synthetic_table(3000, users=60))


def data_of(inter: Interactions) -> SearchData:
    split = leave_one_out(inter)
    return SearchData.from_split(inter, split.train_rows, split.valid, MODEL.max_len)


@pytest.fixture(scope="module")
def ray_local() -> Iterator[None]:
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_test_events_never_reach_the_search(inter: Interactions) -> None:
    # Every user's last event (the test target) replaced: what the search sees must not change.
    items = inter.items.copy()
    for rows in inter.rows_by_user():
        if len(rows) >= 3:
            items[rows[-1]] = items[rows[-1]] % inter.n_items + 1
    other = Interactions(inter.table, inter.users, items, inter.user_ids, inter.item_ids)
    a, b = data_of(inter), data_of(other)
    assert np.array_equal(a.examples.inputs, b.examples.inputs)
    assert np.array_equal(a.examples.targets, b.examples.targets)
    assert np.array_equal(a.valid_targets, b.valid_targets)
    assert all(
        np.array_equal(x, y) for x, y in zip(a.valid_histories, b.valid_histories, strict=True)
    )
    assert a.vocab.items() == b.vocab.items()
    recipe = Recipe.of(MODEL, TRAINER)
    ra = run_trial(recipe, a, MODEL, TRAINER, max_epochs=2, patience=2)
    rb = run_trial(recipe, b, MODEL, TRAINER, max_epochs=2, patience=2)
    assert ra.best_valid_ndcg10 == rb.best_valid_ndcg10


def test_trial_keeps_its_best_epoch_and_stops_on_patience(inter: Interactions) -> None:
    data = data_of(inter)
    seen: list[float] = []
    kept: list[bool] = []

    def report(metrics: dict[str, float], state: object) -> None:
        seen.append(metrics["valid_ndcg10"])
        kept.append(state is not None)

    out = run_trial(Recipe(lr=1e-2), data, MODEL, TRAINER, 30, patience=1, report=report)
    assert out.epochs == len(seen) < 30  # a flat or worse epoch ends it
    assert out.best_valid_ndcg10 == max(seen)
    assert out.best_epoch == int(np.argmax(seen)) + 1
    assert kept[0] and sum(kept) >= 1
    assert out.state is not None


def test_space_searches_negatives_only_where_the_loss_samples() -> None:
    assert "num_negatives" not in search_space(MODEL, 1_000)
    assert "num_negatives" in search_space(MODEL, MODEL.sampled_above + 1)
    m, t = Recipe(d_model=64, n_heads=4, lr=2e-3, batch_size=64).apply(MODEL, TRAINER)
    assert (m.d_model, m.n_heads, m.max_len, t.lr, t.batch_size) == (64, 4, 20, 2e-3, 64)


def test_search_returns_the_best_trial_and_its_weights(
    inter: Interactions, ray_local: None, tmp_path: Path
) -> None:
    data = data_of(inter)
    cfg = TuneConfig(max_trials=3, max_epochs=2, grace_epochs=1, patience=2,
                     budget_cpu_minutes=5, storage_path=tmp_path)  # fmt: skip
    result = search(data, MODEL, TRAINER, cfg, name="t")
    assert len(result.trials) == 3
    assert len({t.trial_id for t in result.trials}) == 3
    scores = [t.best_valid_ndcg10 for t in result.trials if t.best_valid_ndcg10 is not None]
    assert result.best.best_valid_ndcg10 == max(scores)
    assert result.model.d_model == result.best.recipe["d_model"]
    # The first trial is today's recipe, so the winner is never worse than it on validation.
    assert result.trials[0].recipe["d_model"] == MODEL.d_model
    winner = load_winner(result)
    assert data.ndcg10(winner) == pytest.approx(result.best.best_valid_ndcg10, abs=1e-6)
    saved = json.loads(result.save().read_text())
    assert len(saved["trials"]) == 3


def test_budget_ends_the_search(inter: Interactions, ray_local: None, tmp_path: Path) -> None:
    data = data_of(inter)
    # 0.2 CPU minutes (12 CPU s, 18 s of wall time at most) for 100 trials of up to 200 epochs.
    cfg = TuneConfig(max_trials=100, max_epochs=200, grace_epochs=200, patience=200,
                     budget_cpu_minutes=0.2, storage_path=tmp_path)  # fmt: skip
    assert cfg.budget_cpu_s(None) == pytest.approx(12.0)  # set: no epoch needs timing
    assert cfg.wall_limit_s(cfg.budget_cpu_s(None)) == pytest.approx(18.0)
    try:
        result = search(data, MODEL, TRAINER, cfg, name="b")
    except SearchError:
        return  # no trial scored an epoch in time: also the budget at work
    assert len(result.trials) < 100 and result.unstarted == 100 - len(result.trials)
    assert result.seconds < 40
    # Stopped on CPU time: no more than the budget plus the epoch each trial was in.
    assert result.cpu_s < 12.0 + sum(t.cpu_s / max(t.epochs, 1) for t in result.trials) * 2


def test_default_budget_is_trainings_of_the_fixed_recipe() -> None:
    cfg = TuneConfig()
    # 3 trainings of 40 epochs of 2 CPU s: 240 CPU s, 360 s of wall time at most on 2 CPUs
    assert cfg.budget_cpu_s(2.0) == pytest.approx(3 * 40 * 2.0)
    assert cfg.wall_limit_s(cfg.budget_cpu_s(2.0)) == pytest.approx(3 * 240 / 2)
    assert cfg.budget_cpu_s(0.001) == pytest.approx(60.0)  # the 1 CPU minute floor
    assert cfg.budget_cpu_s(1000.0) == pytest.approx(3600.0)  # the 60 CPU minute cap
    with pytest.raises(ValueError, match="cost of an epoch"):
        cfg.budget_cpu_s(None)


def test_an_epoch_over_a_larger_catalog_is_timed_dearer(inter: Interactions) -> None:
    """The default budget follows what training costs on the data: the same events over a
    catalog ~13x as large cost more per epoch (the full softmax), where a budget per event
    would not move."""
    table = synthetic_table(3000, users=60)
    split = [f"{item}-{n % 40}" for n, item in enumerate(table.column("item_id").to_pylist())]
    big = encode(table.set_column(table.schema.get_field_index("item_id"), "item_id",
                                  pa.array(split)))  # fmt: skip
    assert big.n_items > 10 * inter.n_items and len(big.items) == len(inter.items)
    cost_small = epoch_cpu_s(data_of(inter), MODEL, TRAINER)
    cost_big = epoch_cpu_s(data_of(big), MODEL, TRAINER)
    assert 0 < cost_small < cost_big


def test_trials_go_where_the_rounds_train() -> None:
    """On a cluster with training nodes marked, a search's trials ask for the mark, as a round's
    workers do; without one they ask for a CPU anywhere."""
    from training.round_train import worker_resources

    assert trial_resources(TrainerConfig()) == {"cpu": 1.0}
    marked = TrainerConfig(node_resource="streamtune_train")
    assert trial_resources(marked) == {"cpu": 1.0, "streamtune_train": 0.001}
    assert worker_resources(marked, use_gpu=False) == {"CPU": 1.0, "streamtune_train": 0.01}
    assert worker_resources(marked, use_gpu=True) == {"streamtune_train": 0.01}
    assert worker_resources(TrainerConfig(), use_gpu=True) is None


def test_tunes_frequent_snapshot_warning_is_dropped_and_the_slow_one_kept(
    caplog: pytest.LogCaptureFixture,
) -> None:
    import logging

    quiet_tune_logs()
    quiet_tune_logs()  # a second search adds nothing
    state = logging.getLogger("ray.tune.execution.experiment_state")
    assert [type(f).__name__ for f in state.filters].count("_FrequentSnapshots") == 1
    with caplog.at_level(logging.WARNING, logger=state.name):
        state.warning("Experiment state snapshotting has been triggered multiple times ...")
        state.warning("Saving the experiment state ... took ~6.00 seconds")
    assert [r.getMessage()[:6] for r in caplog.records] == ["Saving"]
