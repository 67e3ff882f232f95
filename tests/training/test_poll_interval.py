"""``trainer.poll_s`` reaches Ray Train the one way Ray Train takes it (no Ray started)."""

from __future__ import annotations

import pytest
from ray.train.v2._internal.constants import get_env_vars_to_propagate

from training.config import TrainerConfig
from training.round_train import POLL_ENV, set_poll_interval


def test_the_poll_interval_is_among_what_ray_train_passes_to_its_controller(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(POLL_ENV, raising=False)  # restored after the test
    assert POLL_ENV not in get_env_vars_to_propagate()
    set_poll_interval(TrainerConfig(poll_s=0.25))
    assert get_env_vars_to_propagate()[POLL_ENV] == "0.25"
    assert TrainerConfig().poll_s == 0.5  # the product's default, not Ray's 2 s


def test_a_poll_interval_out_of_range_is_refused() -> None:
    with pytest.raises(ValueError, match="poll_s"):
        TrainerConfig(poll_s=0)
