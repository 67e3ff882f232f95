"""What a round is configured with and what it returns, and what trains its candidate.

``RoundConfig`` holds every setting a round needs besides its data; ``RoundResult`` is what
``training.round.run_round`` returns; ``TrainFn`` is the shape of anything that trains one
round's candidate (``training.round_train.train``, a run per round, or a
``TrainingSession``'s ``train``, workers kept up between rounds).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from pydantic import Field

from streams.config_base import StrictConfig
from training.config import GateConfig, ModelConfig, ReplayConfig, TrainerConfig, TuneConfig
from training.data import Examples
from training.model import Recommender


class RoundConfig(StrictConfig):
    """Everything a round needs besides its data."""

    model: ModelConfig = Field(default_factory=ModelConfig, description="Model architecture.")
    trainer: TrainerConfig = Field(
        default_factory=TrainerConfig, description="Ray Train/DeepSpeed."
    )
    replay: ReplayConfig = Field(default_factory=ReplayConfig, description="Replay and KD.")
    gate: GateConfig = Field(default_factory=GateConfig, description="Promotion gate.")
    tune: TuneConfig = Field(
        default_factory=TuneConfig, description="The first version's recipe search."
    )


@dataclass
class RoundResult:
    version: int
    promoted: bool
    reason: str
    watermark: dict[str, int]
    metrics: dict[str, float] = field(default_factory=dict)
    new_events: int = 0
    items_added: int = 0
    train_s: float = 0.0
    # Offset spans this version first trained on (its own slice and the rejected rounds' it
    # carried; none if rejected), and spans the bounded carry let go (never trained on).
    trained: list[dict[str, Any]] = field(default_factory=list)
    dropped: list[dict[str, Any]] = field(default_factory=list)
    carried_events: int = 0
    # "first" (no champion to start from), "incremental", or "consolidation" (a large replay
    # sample for more epochs, every replay.consolidate_every rounds).
    kind: str = "incremental"
    # Seconds of each part of the round here: prepare (item map, context, examples), train,
    # gate, register. (The loop adds what happens around it: trigger wait, data read.)
    phases: dict[str, float] = field(default_factory=dict)


class TrainFn(Protocol):
    """``train`` or a ``TrainingSession``'s: trains one round, returns model and metrics."""

    def __call__(
        self,
        init: Recommender,
        teacher: Recommender | None,
        examples: Examples,
        cfg: RoundConfig,
        cold: bool = False,
        run_id: str | None = None,
    ) -> tuple[Recommender, dict[str, float]]: ...
