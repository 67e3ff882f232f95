"""Where a round runs: a Ray task on a training node that reads its own data, given only a plan.

The loop (the driver) never holds a round's rows. It plans the round from the buffer's commit log
(which segment objects hold offsets in [after, upto): names and offsets, no bytes) and submits
``run_planned`` as a Ray task. The task reads those segments straight from the buffer's storage
(a local directory or s3://...), takes the new users' history from the latest version's per-user
index (``training.histories``: bounded by the round's users, not by everything buffered), trains
from there and registers the result. So a round's cost follows its new events, and on a cluster
the bytes move between object storage and the training nodes only.

Training is either the driver's long-lived run (a ``training.session.SessionClient`` passed as
``trainer``: the task posts the round to the run's feeder on the head and waits for its result)
or, with no ``trainer``, a new Ray Train run launched by the task for this round.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from streams.buffer import EventBuffer
from streams.config import BufferConfig
from streams.segments import Segment
from training.registry import Registry
from training.round import RoundConfig, RoundResult, TrainFn, run_round

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RoundPlan:
    """What a round reads: segment objects and offset bounds, never rows."""

    buffer: BufferConfig
    segments: tuple[Segment, ...]
    after: dict[str, int]
    upto: dict[str, int]
    fresh_start: bool  # no champion: train from scratch on everything, with no context
    min_events: int
    # Names the round's Ray Train run (or the round in a long-lived run). A task retried after its
    # node died runs the same plan, so Ray Train finds the run in storage and resumes from its last
    # epoch checkpoint (a long-lived run's feeder keeps the round, its progress and its result);
    # a new plan (another loop, a later attempt at the slice) starts a run of its own.
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:16])


@dataclass(frozen=True)
class RoundOutcome:
    result: RoundResult | None
    skipped: str | None = None
    read_s: float = 0.0
    rows: int = 0
    node: str | None = None  # the Ray node the round ran on


def plan_round(
    buffer: EventBuffer,
    after: dict[str, int],
    upto: dict[str, int],
    fresh_start: bool,
    min_events: int,
) -> RoundPlan:
    cfg = buffer.cfg
    if isinstance(cfg.path, Path):  # a Ray worker's working directory is not the driver's
        cfg = cfg.model_copy(update={"path": cfg.path.resolve()})
    return RoundPlan(cfg, tuple(buffer.plan(after, upto)), after, upto, fresh_start, min_events)


def run_planned(
    plan: RoundPlan,
    registry: Registry,
    cfg: RoundConfig,
    extra_meta: dict[str, Any] | None = None,
    trainer: TrainFn | None = None,
) -> RoundOutcome:
    """Read the planned segments, train, gate, register. Runs wherever it is called from;
    ``trainer`` as for ``run_round`` (the loop's long-lived session, if it keeps one)."""
    import time

    import ray

    node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
    t0 = time.monotonic()
    buffer = _open_buffer(plan.buffer)
    try:
        new = buffer.read(plan.after, plan.upto, segments=list(plan.segments))
    except FileNotFoundError:  # compacted since it was planned: same offsets, new objects
        new = buffer.read(plan.after, plan.upto)
    read_s = time.monotonic() - t0
    if new.num_rows < plan.min_events:
        why = f"too few new events: {new.num_rows} < {plan.min_events}"
        return RoundOutcome(None, why, read_s, new.num_rows, node)

    def read_history(users: list[str]) -> pa.Table:
        # Only for a latest version registered before versions carried a history index.
        log.warning("the latest version has no history index; reading history from the buffer")
        history = buffer.read(upto=plan.after)
        return history.filter(pc.is_in(history["user_id"], value_set=pa.array(users)))

    context = new.slice(0, 0) if plan.fresh_start else None
    result = run_round(new, context, plan.upto, registry, cfg, extra_meta, read_history,
                       run_id=plan.run_id, trainer=trainer)  # fmt: skip
    return RoundOutcome(result, None, read_s, new.num_rows, node)


_buffers: dict[str, EventBuffer] = {}


def _open_buffer(cfg: BufferConfig) -> EventBuffer:
    """The buffer a plan names, opened once per process: opening one replays its commit log
    from the last checkpoint (hundreds of small reads with ingest flushing every 0.2 s), while
    an open one only folds what is new when asked."""
    key = cfg.model_dump_json()
    if key not in _buffers:
        _buffers[key] = EventBuffer(cfg)
    return _buffers[key]


def run_on_cluster(
    plan: RoundPlan,
    registry: Registry,
    cfg: RoundConfig,
    extra_meta: dict[str, Any] | None = None,
    trainer: TrainFn | None = None,
) -> RoundOutcome:
    """``run_planned`` as a Ray task on a training node (``trainer.node_resource``).

    ``trainer``: a picklable ``TrainFn`` the task trains with, e.g. the driver's long-lived run
    (``TrainingSession.client``); None: the task launches a new Ray Train run for the round."""
    import ray

    if not ray.is_initialized():
        ray.init(include_dashboard=False)
    resources = cfg.trainer.on_training_nodes() or None
    # No CPU of its own: the task only waits on the Ray Train job, whose workers hold the CPUs.
    # Retried if its node dies (never on an exception): a rerun plans nothing new (and posts the
    # same round id to a long-lived run, which trains it once), and the registry's expect_latest
    # check makes a rerun after a registration a no-op.
    task = ray.remote(run_planned).options(num_cpus=0, resources=resources, max_retries=2)
    outcome: RoundOutcome = ray.get(task.remote(plan, registry, cfg, extra_meta, trainer))
    return outcome
