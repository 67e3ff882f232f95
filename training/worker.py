"""What each Ray Train worker runs in a round: DeepSpeed data parallelism over its shard.

The driver (``training.round_train``) puts the round's examples and starting weights in Ray's
object store and passes their refs in ``config``; nothing here knows about Kafka or the registry.
Each epoch ends with a checkpoint (rank 0 writes consolidated safetensors; ZeRO-2 shards only
optimizer state and gradients, so rank 0's module holds the full weights), so a retried round
resumes from the last finished epoch instead of starting over. Every report carries
``start_epoch`` (the epoch this attempt began at; > 0 only when it resumed from a checkpoint) and
``progress.json`` records it too, so a resumed attempt is visible from outside.

The teacher for distillation (the champion, which may have fewer rows than the grown student) is
``Recommender.frozen_teacher()``: rows new this round are left out of the distillation term.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from training import rows
from training.config import ModelConfig, ReplayConfig, TrainerConfig
from training.data import Examples
from training.feeder import IDLE
from training.fit import LrSchedule, fit
from training.model import Recommender

log = logging.getLogger(__name__)

# Rank 0 asks the feeder for a round for this long before every rank goes round again; the other
# ranks wait for it on the control group, whose timeout must outlast that and a round's data read.
IDLE_WAIT_S = 30.0
CONTROL_TIMEOUT = timedelta(minutes=10)
GRADIENT_CLIPPING = 1.0  # DeepSpeed's for the dense parameters, RowTable's for the item table


def deepspeed_config(tcfg: TrainerConfig, on_gpu: bool) -> dict[str, Any]:
    return {
        "train_micro_batch_size_per_gpu": tcfg.batch_size,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": tcfg.zero_stage},
        # A plain torch AdamW: DeepSpeed's fused optimizers need compiled ops we do not build.
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": on_gpu},
        "gradient_clipping": GRADIENT_CLIPPING,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


SHM_KERNEL = "deepspeed_shm_comm"  # DeepSpeed's op name (``ShareMemCommBuilder.NAME``)


def skip_inference_kernel() -> None:
    """Keep DeepSpeed from building its shared-memory all-reduce kernel in this process.

    DeepSpeed's CPU backend compiles it at a process's first ``deepspeed.initialize`` (33-53 s on
    2 cores the first time per install, and again whenever another environment's build is the
    one cached), yet only ``inference_all_reduce`` uses it: training's collectives go through
    torch.distributed (gloo). DeepSpeed reads whether an op may be built from its table of
    compatible ops, and keeps edits to it (``deepspeed.ops.__getattr__``).
    """
    import deepspeed.ops

    ops: dict[str, bool] = deepspeed.ops.__compatible_ops__
    ops[SHM_KERNEL] = False


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """One round per Ray Train run (``training.round_train.train``); its data in ``config``."""
    import ray
    import ray.train

    _setup(config)
    resume = _resume_point()
    _train_round(config, ray.get(config["data_ref"]), resume, _Cadence(every_epoch=True))


def rounds_loop_per_worker(config: dict[str, Any]) -> None:
    """A long-lived run (``training.session.TrainingSession``): round after round from the
    session's feeder actor, each ending with a report to it (rank 0); None from it ends the run.

    Rank 0 alone takes rounds from the feeder and tells the other ranks which one over a gloo
    group of their own (ids only: object refs do not travel through torch), so the whole group
    trains the same round and the feeder counts one attempt per group. After a worker-group
    restart the feeder hands out the unfinished round again, and the last checkpoint (its
    progress names the round) resumes it after its last finished epoch.
    """
    import ray
    import ray.train
    import torch.distributed as dist

    _setup(config)
    rank = ray.train.get_context().get_world_rank()
    feeder = config["feeder"]
    control = (
        dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT) if dist.is_initialized() else None
    )
    resume = _resume_point()
    cadence = _Cadence(every_epoch=False)
    while True:
        pick = _share(_next_round(feeder) if rank == 0 else None, control)
        if pick is None:
            return
        if pick == IDLE:  # every rank goes round again
            continue
        round_id, gen = pick
        taken = _take(feeder, round_id, gen, control)
        if taken is None:
            if rank == 0:
                ray.get(feeder.not_taken.remote(round_id, gen))
            continue
        job, data = taken
        round_config = {**config, **job["config"], "round_id": round_id}
        at = resume if resume is not None and resume[0] == round_id else None
        state, metrics = _train_round(round_config, data, at, cadence)
        if rank == 0:
            ray.get(feeder.round_done.remote(round_id, state, metrics))
        resume = None


def _next_round(feeder: Any) -> Any:
    """(rank 0) The feeder's next pick; None (end the run) if the feeder is gone: the session
    was closed past its timeout, or its driver died. Raising instead would have Ray Train
    restart the group (max_failures=-1) again and again against a feeder that is not coming
    back."""
    import ray
    from ray.exceptions import RayActorError

    try:
        return ray.get(feeder.next_round.remote(IDLE_WAIT_S))
    except RayActorError as err:
        log.warning("the session's feeder is gone (%s): ending the run", type(err).__name__)
        return None


def _share(value: Any, group: Any) -> Any:
    """Rank 0's ``value`` on every rank of ``group`` (None: a group of one)."""
    import torch.distributed as dist

    if group is None:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0, group=group)
    return box[0]


def _take(
    feeder: Any, round_id: str, gen: int, group: Any
) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """The round's job and data on every rank, or None on every rank if any could not read them:
    a round posted again since (a newer generation), or data lost with its poster (a round task
    on a node that died; its retry posts the round again)."""
    import ray
    import torch.distributed as dist

    job = ray.get(feeder.job.remote(round_id, gen))
    data = None
    if job is not None:
        try:
            data = ray.get(job["data"][0])
        except ray.exceptions.ObjectLostError as err:
            log.warning("round %s: its data is lost (%s); waiting for it to be posted again",
                        round_id, type(err).__name__)  # fmt: skip
    ok = torch.tensor([int(data is not None)])
    if group is not None:
        dist.all_reduce(ok, op=dist.ReduceOp.MIN, group=group)
    if not ok.item() or job is None or data is None:
        return None
    return job, data


def _setup(config: dict[str, Any]) -> None:
    skip_inference_kernel()
    tcfg = TrainerConfig(**config["trainer_config"])
    if tcfg.nice:  # batch work: a request or an ingest poll waiting on this CPU goes first
        os.nice(tcfg.nice)


Resume = tuple[str | None, int, dict[str, torch.Tensor]]  # (round id, next epoch, weights)


class _Cadence:
    """Which epochs end with a checkpoint.

    A run per round checkpoints every epoch: its last checkpoint is its result. A long-lived run
    hands its result to the feeder, so a round's last epoch needs none, and an earlier one only
    once ``trainer.checkpoint_every_s`` of training has passed since the last checkpoint: Ray
    Train's controller takes one report per worker per poll (``trainer.poll_s``; Ray's own 2 s
    then) and a report waits while the one before it is queued, so a checkpoint per small round
    cost every round up to 2 s, more than training it again after a worker died. Every rank must
    agree (``ray.train.report`` is a barrier), so the ranks take the longest of their clocks.
    """

    def __init__(self, every_epoch: bool) -> None:
        self.every_epoch = every_epoch
        self.trained_s = 0.0  # training seconds since this worker's last checkpoint

    def due(self, epoch: int, epochs: int, epoch_s: float, every_s: float) -> bool:
        self.trained_s += epoch_s
        if self.every_epoch:
            return True
        if epoch + 1 >= epochs:
            return False
        return _longest(self.trained_s) >= every_s

    def done(self) -> None:
        self.trained_s = 0.0


def _longest(seconds: float) -> float:
    """The largest of every rank's ``seconds`` (this rank's alone outside a process group)."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return seconds
    t = torch.tensor([seconds], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def _resume_point() -> Resume | None:
    """Where the run's last checkpoint left off (a restarted worker group), if anywhere."""
    import ray.train
    from safetensors.torch import load_file

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as d:
        progress = json.loads((Path(d) / "progress.json").read_text())
        weights = load_file(str(Path(d) / "model.safetensors"))
    return progress.get("round"), int(progress["epoch"]) + 1, weights


def _models(
    mcfg: ModelConfig, data: dict[str, Any], resume: Resume | None
) -> tuple[Recommender, Recommender | None, int]:
    """The round's starting model, its frozen teacher (if any) and its first epoch: a retried
    round continues after its last finished epoch."""
    model = Recommender.from_state(mcfg, data["init_state"])
    teacher = None
    if data.get("teacher_state") is not None:
        teacher = Recommender.from_state(mcfg, data["teacher_state"]).frozen_teacher()
    if resume is not None:
        return Recommender.from_state(mcfg, resume[2]), teacher, resume[1]
    return model, teacher, 0


def _report(
    metrics: dict[str, Any], weights: dict[str, torch.Tensor] | None, progress: dict[str, Any]
) -> None:
    """An epoch's checkpointed report (every rank reports; rank 0, with ``weights``, writes)."""
    import ray.train

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = None
        if weights is not None:
            save_file(weights, str(Path(tmp) / "model.safetensors"))
            (Path(tmp) / "progress.json").write_text(json.dumps(progress))
            ckpt = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report(metrics, checkpoint=ckpt)


def _train_round(
    config: dict[str, Any], data: dict[str, Any], resume: Resume | None, cadence: _Cadence
) -> tuple[dict[str, Any] | None, dict[str, float]]:
    """Train one round; returns (rank 0: the trained weights as numpy, else None) and the last
    epoch's metrics. An epoch ends with a checkpointed ``ray.train.report`` when ``cadence``
    says so."""
    import deepspeed
    import ray
    import ray.train
    import ray.train.torch

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    mcfg = ModelConfig(**config["model_config"])
    tcfg = TrainerConfig(**config["trainer_config"])
    rcfg = ReplayConfig(**config["replay_config"])
    round_id = config.get("round_id")
    torch.manual_seed(tcfg.seed)
    model, teacher, start_epoch = _models(mcfg, data, resume)
    on_gpu = bool(config["use_gpu"]) and torch.cuda.is_available()
    device = ray.train.torch.get_device() if on_gpu else torch.device("cpu")
    if teacher is not None:
        teacher.to(device)
    distils = teacher is not None and rcfg.kd_weight > 0
    optimizer, table = rows.optimizers(model, tcfg, distils, on_gpu, GRADIENT_CLIPPING)
    # A new engine per round: the item table grows with the catalog, and ZeRO partitions the
    # optimizer state by parameter shape. (The process group, the costly part, stays up.)
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, config=deepspeed_config(tcfg, on_gpu)
    )
    shard = Examples(data["inputs"], data["targets"]).shard(rank, world)
    last: dict[str, float] = {"start_epoch": start_epoch, "pid": os.getpid()}  # resumed at the end

    def step(loss: torch.Tensor) -> None:
        engine.backward(loss)
        if table is not None:
            table.step(optimizer.param_groups[0]["lr"])
        engine.step()

    def weights() -> dict[str, torch.Tensor]:
        return {k: v.detach().float().cpu().contiguous()
                for k, v in engine.module.state_dict().items()}  # fmt: skip

    def on_epoch(epoch: int, m: dict[str, float]) -> None:
        # Shards are equal, so the round's throughput is this worker's times the world size.
        metrics = {"epoch": epoch, "loss": m["loss"], "samples_per_s": m["samples_per_s"] * world,
                   "start_epoch": start_epoch, "nice": os.nice(0), "pid": os.getpid(),
                   "row_wise_table": float(table is not None)}  # fmt: skip
        last.update(metrics)
        if not cadence.due(epoch, tcfg.epochs, m["seconds"], tcfg.checkpoint_every_s):
            return
        cadence.done()
        progress = {"epoch": epoch, "start_epoch": start_epoch, "round": round_id}
        _report(metrics, weights() if rank == 0 else None, progress)

    # The schedule sets the base optimizer's groups: ZeRO's wrapper steps those same groups.
    schedule = LrSchedule.for_run(tcfg.lr, len(shard), tcfg.batch_size, tcfg.epochs,
                                  tcfg.warmup_epochs, tcfg.lr_schedule)  # fmt: skip
    fit(
        engine.module,
        shard,
        step,
        epochs=tcfg.epochs,
        batch_size=tcfg.batch_size,
        seed=tcfg.seed + rank,
        teacher=teacher,
        kd_weight=rcfg.kd_weight,
        kd_temperature=rcfg.kd_temperature,
        start_epoch=start_epoch,
        on_epoch=on_epoch,
        device=device,
        schedule=schedule,
        optimizer=optimizer,
    )
    state = {k: v.numpy() for k, v in weights().items()} if rank == 0 else None
    return state, last
