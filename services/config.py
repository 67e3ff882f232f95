"""Typed configuration of the continual loop service."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


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
    poll_s: float = Field(default=2.0, gt=0, description="How often the buffer is checked.")
    compact_every_s: float = Field(
        default=300.0, gt=0, description="How often the buffer is compacted."
    )
