"""The small rounds tests and benchmarks train, one definition.

A round's settings are the product's (``training.config``'s defaults, as `up` reads them)
with a small model and short training, so that a round takes seconds on two cores and a fault can
land in the middle of one. Each caller changes only what its workload needs (epochs, batch,
failures allowed, where checkpoints go); everything it does not name is the product's default.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from training.config import GateConfig, ModelConfig, ReplayConfig, TrainerConfig
from training.round import RoundConfig


def small_round(
    storage_path: str | Path,
    epochs: int,
    *,
    first_round_epochs: int | None = None,
    n_layers: int = 2,
    batch_size: int = 64,
    replay_ratio: float = 1.0,
    kd_weight: float = 0.0,
    tolerance: float = 0.02,
    **trainer: Any,
) -> RoundConfig:
    """A round of a width-32 model over 20 items of history, ``n_layers`` blocks (two by
    default: enough work per epoch that a kill lands mid-round), ``epochs`` per round (the first
    round too unless ``first_round_epochs``), 2 workers at lr 5e-3, a 2,000-example reservoir, a
    gate over at least 10 users with ``tolerance`` (1.0 promotes every round). ``trainer``: any
    other ``TrainerConfig`` field (``max_failures``, ``storage``, ``node_resource``, ...)."""
    return RoundConfig(
        model=ModelConfig(max_len=20, d_model=32, n_layers=n_layers, text_init=False),
        trainer=TrainerConfig(
            num_workers=2,
            epochs=epochs,
            first_round_epochs=epochs if first_round_epochs is None else first_round_epochs,
            batch_size=batch_size,
            lr=5e-3,
            storage_path=storage_path,
            **trainer,
        ),
        replay=ReplayConfig(capacity=2000, ratio=replay_ratio, kd_weight=kd_weight),
        gate=GateConfig(min_eval_users=10, tolerance=tolerance),
    )
