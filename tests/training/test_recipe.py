"""The training recipe's pieces: the learning-rate schedule, early stopping, recency popularity."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from training.config import ModelConfig
from training.data import Examples
from training.evaluation import PopularityScorer
from training.fit import LrSchedule, fit, torch_step
from training.model import Recommender


def test_schedule_warms_up_linearly_then_decays_to_the_floor() -> None:
    s = LrSchedule(peak=1.0, total_steps=110, warmup_steps=10)
    assert [s(i) for i in range(3)] == pytest.approx([0.1, 0.2, 0.3])
    assert s(9) == pytest.approx(1.0)
    assert s(10) == pytest.approx(1.0)
    assert s(60) == pytest.approx(0.5)
    assert s(109) < 0.01 and s(500) == pytest.approx(0.0)
    flat = LrSchedule(peak=2.0, total_steps=100, warmup_steps=0, decay="constant")
    assert {flat(i) for i in range(100)} == {2.0}
    run = LrSchedule.for_run(
        1.0, n=1000, batch_size=100, epochs=3, warmup_epochs=0.5, decay="cosine"
    )
    assert (run.total_steps, run.warmup_steps) == (30, 5)


def _examples(n: int = 64, length: int = 8, items: int = 20) -> Examples:
    rng = np.random.default_rng(0)
    inputs = rng.integers(1, items, size=(n, length))
    targets = np.roll(inputs, -1, axis=1)
    targets[:, -1] = 0
    return Examples(inputs.astype(np.int64), targets.astype(np.int64))


def test_fit_sets_the_scheduled_rate_every_step_and_resumes_on_schedule() -> None:
    model = Recommender(ModelConfig(max_len=8, d_model=16, n_heads=2, text_init=False), 20)
    opt = torch.optim.AdamW(model.parameters(), lr=1.0)
    seen: list[float] = []
    step = torch_step(model, 1.0, opt=opt)

    def record(loss: torch.Tensor) -> None:
        seen.append(opt.param_groups[0]["lr"])
        step(loss)

    sched = LrSchedule(peak=1e-3, total_steps=8, warmup_steps=2)
    fit(model, _examples(), record, epochs=2, batch_size=16, schedule=sched, optimizer=opt)
    assert seen == pytest.approx([sched(i) for i in range(8)])
    seen.clear()  # a run resumed at epoch 1 continues at global step 4, not back at warm-up
    fit(model, _examples(), record, epochs=2, batch_size=16, start_epoch=1, schedule=sched,
        optimizer=opt)  # fmt: skip
    assert seen == pytest.approx([sched(i) for i in range(4, 8)])
    with pytest.raises(ValueError, match="schedule needs the optimizer"):
        fit(model, _examples(), record, epochs=1, batch_size=16, schedule=sched)


def test_on_epoch_returning_true_stops_training() -> None:
    model = Recommender(ModelConfig(max_len=8, d_model=16, n_heads=2, text_init=False), 20)
    epochs: list[int] = []
    out = fit(model, _examples(), torch_step(model, 1e-3), epochs=10, batch_size=32,
              on_epoch=lambda e, _m: epochs.append(e) or e == 2)  # fmt: skip
    assert epochs == [0, 1, 2] and out["epochs"] == 3.0


def test_recency_popularity_prefers_what_is_popular_now() -> None:
    items = np.array([1, 1, 1, 2, 2])  # item 1 was popular, item 2 is popular now
    plain = PopularityScorer(items, 3).score([np.array([], dtype=np.int64)])[0]
    recent = PopularityScorer(items, 3, half_life=1.0).score([np.array([], dtype=np.int64)])[0]
    assert plain[1] > plain[2]
    assert recent[2] > recent[1]
    assert recent[2] == pytest.approx(1.0 + 0.5) and recent[1] == pytest.approx(
        0.25 + 0.125 + 0.0625
    )
    forever = PopularityScorer(items, 3, half_life=1e12).score([np.array([], dtype=np.int64)])[0]
    assert forever[1:] == pytest.approx(plain[1:])
    with pytest.raises(ValueError, match="half_life"):
        PopularityScorer(items, 3, half_life=0.0)
