"""Training rounds for real: Ray Train workers running DeepSpeed ZeRO-2 over gloo on CPU."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import psutil
import pytest
import ray

from harness.faults_training import WorkerKiller, fault_worker_kill
from harness.rounds import small_round
from tests.training.data_gen import synthetic_table, watermark_of
from training import round_finish as round_module
from training.config import GateConfig, ModelConfig, ReplayConfig, TrainerConfig
from training.errors import RoundFailedError
from training.gate import GateResult
from training.registry import Registry
from training.round import RoundConfig, RoundResult, TrainFn, run_round
from training.session import TrainingSession

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module", autouse=True)
def ray_cluster() -> Iterator[None]:
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def config(tmp: Path, **trainer: object) -> RoundConfig:
    base = {"num_workers": 2, "epochs": 3, "first_round_epochs": 3, "batch_size": 64, "lr": 5e-3}
    return RoundConfig(
        model=ModelConfig(max_len=20, d_model=32, n_layers=2, text_init=True),
        trainer=TrainerConfig.model_validate({**base, "storage_path": tmp / "ray", **trainer}),
        replay=ReplayConfig(capacity=2000, ratio=1.0),
        gate=GateConfig(min_eval_users=10, tolerance=0.02),
    )


def test_two_rounds_register_warm_start_and_grow(tmp_path: Path) -> None:
    """Warm starts, a growing catalog and a rejected round, through the long-lived run that
    ``up`` keeps (a run per round, the other way, is what the tests below exercise)."""
    session = TrainingSession()
    try:
        results = rounds_through(session.train, tmp_path)
    finally:
        session.close()
    assert len({r.metrics["train_pid"] for r in results}) == 1  # one run trained all four


def rounds_through(trainer: TrainFn, tmp_path: Path) -> list[RoundResult]:
    reg = Registry(tmp_path / "registry")
    cfg = config(tmp_path, nice=10, epochs=1)  # the warm rounds' quality is not asserted
    first = synthetic_table(3000, seed=2)
    r1 = run_round(first, first.slice(0, 0), watermark_of(first), reg, cfg, trainer=trainer)
    assert r1.version == 1 and r1.promoted, r1.reason
    loaded = reg.load(1)
    assert loaded.meta["watermark"] == watermark_of(first) == {"events:0": 3000}
    assert loaded.meta["parent"] is None and loaded.meta["new_events"] == 3000
    # Training yields the CPU (trainer.nice=10, added to what Ray gives its workers; max 19).
    base = ray.get(ray.remote(lambda: os.nice(0)).remote())
    assert loaded.meta["metrics"]["train_nice"] == min(19, base + 10) > base
    assert loaded.model.n_rows == len(loaded.vocab)

    second = synthetic_table(2000, seed=2, start=3000)
    r2 = run_round(second, first, watermark_of(second), reg, cfg, trainer=trainer)
    assert r2.version == 2 and r2.items_added > 0
    meta2 = reg.meta(2)
    assert meta2["parent"] == 1 and meta2["watermark"] == {"events:0": 5000}
    v2 = reg.load(2)
    old, new = loaded.vocab, v2.vocab
    assert new.items()[: old.n_items] == old.items()  # old ids keep their rows
    assert v2.model.n_rows == len(new) > len(old)
    assert meta2["replay_examples"] > 0  # history was replayed into the round
    assert reg.champion() == (2 if r2.promoted else 1)
    assert [d["version"] for d in reg.decisions()] == [1, 2]

    # A rejected round still extends the item map and the replay lineage; the next round starts
    # from the (older) champion but must keep every row the rejected version assigned.
    champion = reg.champion()
    third = synthetic_table(1500, seed=2, start=5000)
    with pytest.MonkeyPatch.context() as mp:  # a gate that rejects whatever it is shown
        mp.setattr(round_module, "gate", lambda *a, **k: GateResult(False, "rejected", {}))
        r3 = run_round(third, second, {"events:0": 6500}, reg, cfg, trainer=trainer)
    assert not r3.promoted and reg.champion() == champion
    fourth = synthetic_table(1500, seed=2, start=6500)
    r4 = run_round(fourth, third, {"events:0": 8000}, reg, cfg, trainer=trainer)
    v3, v4 = reg.load(3), reg.load(4)
    assert v4.vocab.items()[: v3.vocab.n_items] == v3.vocab.items()
    assert v4.model.n_rows == len(v4.vocab) and v4.meta["parent"] == champion
    assert r4.version == 4
    return [r1, r2, r3, r4]


def test_worker_killed_from_outside_resumes_from_checkpoint(tmp_path: Path) -> None:
    """SIGKILL of a Ray Train worker process after the first checkpoint (bench.faults' row)."""
    row = fault_worker_kill(tmp_path, quick=True)
    assert row["killed_pid"] is not None and not psutil.pid_exists(row["killed_pid"]), row
    assert row["resumed_start_epoch"] > 0, row  # the retry resumed from the checkpoint
    assert row["versions"] == [1], row  # exactly one version registered
    assert row["survived"] and row["duplicated"] == 0 and row["recover_s"] is not None, row


def test_worker_death_without_retries_fails_cleanly(tmp_path: Path) -> None:
    reg = Registry(tmp_path / "registry")
    table = synthetic_table(2500, seed=5)
    cfg = small_round(tmp_path / "ray", epochs=8, max_failures=0)  # the kill lands mid-round
    killer = WorkerKiller(tmp_path / "ray", seed=1).start()
    try:
        with pytest.raises(RoundFailedError, match="training job failed"):
            run_round(table, table.slice(0, 0), watermark_of(table), reg, cfg)
    finally:
        killer.stop()
    assert killer.killed_pid is not None and killer.killed_gone, killer.error
    # Nothing partial: no version, no temp directory, no champion, no decision.
    assert reg.versions() == [] and reg.champion() is None and reg.decisions() == []
    assert not list(reg.root.glob(".tmp-*")) and not list(reg.root.glob("v*"))


def test_distillation_round_that_adds_items(tmp_path: Path) -> None:
    """kd_weight > 0 with a growing catalog: the champion (fewer rows) teaches the grown model."""
    reg = Registry(tmp_path / "registry")
    cfg = small_round(tmp_path / "ray", epochs=3, max_failures=0, kd_weight=0.5)
    first = synthetic_table(2500, seed=3)
    r1 = run_round(first, first.slice(0, 0), watermark_of(first), reg, cfg)
    assert r1.version == 1 and r1.promoted, r1.reason
    second = synthetic_table(1500, seed=3, start=2500)
    r2 = run_round(second, first, watermark_of(second), reg, cfg)
    assert r2.version == 2 and r2.items_added > 0  # the teacher saw inputs it never knew
    meta = reg.meta(2)
    assert meta["replay_config"]["kd_weight"] == 0.5 and meta["parent"] == 1
    assert reg.load(2).model.n_rows > reg.load(1).model.n_rows
    assert np.isfinite(r2.metrics["train_loss"])


def test_a_sampled_round_trains_the_item_table_row_wise(tmp_path: Path) -> None:
    """The sampled loss on DeepSpeed workers: the item table leaves ZeRO's optimizer and is
    trained row-wise (``training.rows``), and the round's version learned from it."""
    reg = Registry(tmp_path / "registry")
    base = config(tmp_path, epochs=1, first_round_epochs=1)
    model = base.model.model_copy(update={"loss": "sampled", "num_negatives": 16})
    cfg = base.model_copy(update={"model": model})
    first = synthetic_table(1500, seed=4)
    r1 = run_round(first, first.slice(0, 0), watermark_of(first), reg, cfg)
    assert r1.version == 1
    assert r1.metrics["train_row_wise_table"] == 1.0
    assert np.isfinite(r1.metrics["train_loss"])
    v1 = reg.load(1)
    assert v1.model.samples_loss() and v1.model.backbone.wte.weight.requires_grad
