"""Typed configuration of the continual loop service."""

from __future__ import annotations

from typing import Self

from pydantic import BaseModel, ConfigDict, Field, model_validator


class LoopConfig(BaseModel):
    """When to train: every ``min_new_events`` new events or ``max_wait_s``, whichever first."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    min_new_events: int = Field(
        default=5_000, ge=1, description="Train as soon as this many new events are buffered."
    )
    max_wait_s: float = Field(
        default=120.0, gt=0, description="Train at least this often if any events are new."
    )
    min_round_events: int = Field(
        default=500, ge=1, description="Skip a round with fewer new events than this."
    )
    max_pending_s: float = Field(
        default=600.0,
        gt=0,
        description=(
            "Train on whatever is pending, fewer than min_round_events included, once it has "
            "waited this long: the tail of a stream that went quiet is not left untrained "
            "until more events arrive."
        ),
    )
    poll_s: float = Field(default=2.0, gt=0, description="How often the buffer is checked.")
    compact_every_s: float = Field(
        default=300.0, gt=0, description="How often the buffer is compacted."
    )
    round_on_cluster: bool = Field(
        default=False,
        description=(
            "Run each round as a Ray task on a training node that reads its planned segments "
            "itself (cluster mode); false: the loop's own process runs the same planned round "
            "(one machine, where there is no other node to move the work to)."
        ),
    )
    long_lived_trainer: bool = Field(
        default=False,
        description=(
            "Keep one Ray Train run up across rounds (training.session): its workers wait for "
            "the next round instead of a new run per round, which saves Ray Train's start-up "
            "(~10-16 s here) on every round. Runs in the loop's process, so not with "
            "round_on_cluster."
        ),
    )
    # bench.freshness --micro on 2026-11-29: at niceness 0 and two torch threads, each gate
    # (0.4-0.7 s) held the /recommend requests that overlapped it for up to 0.4 s; every slow
    # history probe of the run overlapped a gate.
    nice: int = Field(
        default=15,
        ge=0,
        le=19,
        description=(
            "Niceness of the loop's thread, which does a round's own work in this process "
            "(read, prepare, gate, register; training runs in Ray workers), with torch on that "
            "one thread. Ray starts its workers, Serve replicas and the history actor included, "
            "at 15: at 15 the round shares the CPU with requests instead of preempting them. "
            "0 = leave this thread and torch's threads as they are."
        ),
    )

    @model_validator(mode="after")
    def _one_place_for_rounds(self) -> Self:
        if self.long_lived_trainer and self.round_on_cluster:
            raise ValueError(
                "loop.long_lived_trainer keeps the training run in the loop's process and "
                "loop.round_on_cluster runs each round as a task elsewhere: set one of them"
            )
        return self


class SupervisorConfig(BaseModel):
    """How `streamtune up` restarts a component that died, and when it gives up instead."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    max_restarts: int = Field(
        default=5, ge=0, description="Restarts of one component allowed within ``window_s``."
    )
    window_s: float = Field(
        default=300.0, gt=0, description="Sliding window in which restarts are counted."
    )
    backoff_s: float = Field(
        default=1.0, ge=0, description="Wait before the first restart; doubles per restart."
    )
    backoff_max_s: float = Field(default=30.0, ge=0, description="Longest wait before a restart.")
    liveness_s: float = Field(
        default=5.0, gt=0, description="How often actors (history context) are pinged."
    )
    liveness_timeout_s: float = Field(
        default=10.0, gt=0, description="A ping unanswered this long counts as a dead actor."
    )
    gauges_every_s: float = Field(
        default=5.0,
        gt=0,
        description="How often lag and freshness are measured and gauges re-reported to Ray.",
    )
    stop_timeout_s: float = Field(
        default=25.0,
        gt=0,
        description="Budget for a clean stop (ingest flush, Serve, Ray, broker).",
    )
