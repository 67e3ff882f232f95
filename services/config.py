"""Typed configuration of the continual loop service."""

from __future__ import annotations

from pydantic import Field

from streams.config_base import StrictConfig


class LoopConfig(StrictConfig):
    """When to train: continuously, a round as soon as the previous one is registered and enough
    events are pending; each round takes what is pending, up to ``max_round_events``."""

    # A round's cost barely depends on its size below ~1,000 events, so waiting for more events
    # only adds to their freshness.
    min_round_events: int = Field(
        default=1,
        ge=1,
        description=(
            "A round starts once this many events are pending (and the previous round is "
            "registered). With 1, the next round starts as soon as the previous one is "
            "registered and anything is new: a slow stream gets small rounds, a fast one larger "
            "rounds (whatever arrived while the previous round ran)."
        ),
    )
    max_round_events: int = Field(
        default=10_000,
        ge=1,
        description=(
            "The most events one warm round takes (oldest first); the rest go to the next round. "
            "Bounds a round's time, so one burst cannot hold every later event back for long."
        ),
    )
    first_round_events: int = Field(
        default=1_000,
        ge=1,
        description=(
            "The first version (no champion yet) waits for this many buffered events, or for "
            "first_round_wait_s of quiet: with fewer it can neither learn much nor be gated."
        ),
    )
    first_round_wait_s: float = Field(
        default=30.0,
        gt=0,
        description="The first version trains on fewer than first_round_events once they have "
        "waited this long (its round is long and needs enough users to gate).",
    )
    # 5 s here left a slow stream's events (and a fast one's last ones) waiting 5 s for a round
    # that takes ~2: the freshness goal is 2 s at the median.
    max_pending_s: float = Field(
        default=1.0,
        gt=0,
        description=(
            "Train on whatever is pending, fewer than min_round_events included, once it has "
            "waited this long: a slow or quiet stream's events are not left untrained."
        ),
    )
    # A check reads two small files: cheap enough to look often, so no round waits on the clock.
    poll_s: float = Field(
        default=0.1, gt=0, description="How often the buffer is checked while no round runs."
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
        default=True,
        description=(
            "Keep one Ray Train run up across rounds (training.session): its workers wait for "
            "the next round instead of a new run per round, which saves Ray Train's start-up "
            "(~10-16 s on 2 cores) on every round. With round_on_cluster the round task on a "
            "training node trains through it too. false: a new Ray Train run per round."
        ),
    )
    # Without it, each gate (a burst of CPU in the loop's thread) held the /recommend requests
    # that overlapped it: every slow history probe overlapped a gate.
    nice: int = Field(
        default=15,
        ge=0,
        le=19,
        description=(
            "Niceness of the loop's thread, which does a round's own work in this process "
            "(read, prepare, gate, register; training runs in Ray workers), with torch on that "
            "one thread. Serve replicas and the history shards run at serving.worker_niceness "
            "(0 when streamtune starts Ray): at 15 the round yields the CPU to requests instead "
            "of preempting them. 0 = leave this thread and torch's threads as they are."
        ),
    )
    compact_every_s: float = Field(
        default=300.0, gt=0, description="How often the buffer is compacted."
    )
    keep_rounds: int = Field(
        default=2_000,
        ge=10,
        description=(
            "Round records kept in the loop's state file (which slices each version trained on, "
            "for freshness and 'never trained' accounting); older ones are dropped, their "
            "counts kept as totals."
        ),
    )


class SupervisorConfig(StrictConfig):
    """How `streamtune up` restarts a component that died, and when it gives up instead."""

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
