"""What each Ray Train worker runs in a round: DeepSpeed data parallelism over its shard.

The driver (training/round.py) puts the round's examples and starting weights in Ray's object store
and passes their refs in ``config``; nothing here knows about Kafka or the registry. Each epoch ends
with a checkpoint (rank 0 writes consolidated safetensors; ZeRO-2 shards only optimizer state and
gradients, so rank 0's module holds the full weights), so a retried round resumes from the last
finished epoch instead of starting over. Every report carries ``start_epoch`` (the epoch this
attempt began at; > 0 only when it resumed from a checkpoint) and ``progress.json`` records it
too, so a resumed attempt is visible from outside.

The teacher for distillation (the champion, which may have fewer rows than the grown student) is
``Recommender.frozen_teacher()``: rows new this round are left out of the distillation term.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from training.config import ModelConfig, ReplayConfig, TrainerConfig
from training.data import Examples
from training.fit import LrSchedule, fit
from training.model import Recommender


def deepspeed_config(tcfg: TrainerConfig, on_gpu: bool) -> dict[str, Any]:
    return {
        "train_micro_batch_size_per_gpu": tcfg.batch_size,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": tcfg.zero_stage},
        # A plain torch AdamW: DeepSpeed's fused optimizers need compiled ops we do not build.
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": on_gpu},
        "gradient_clipping": 1.0,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """One round per Ray Train run (``training.round.train``): the round's data in ``config``."""
    import ray
    import ray.train

    _setup(config)
    resume = _resume_point()
    _train_round(config, ray.get(config["data_ref"]), resume)


def rounds_loop_per_worker(config: dict[str, Any]) -> None:
    """A long-lived run (``training.session.TrainingSession``): round after round from the
    session's feeder actor, each ending with a report to it (rank 0); None from it ends the run.

    After a worker-group restart the feeder hands out the unfinished round again, and the last
    checkpoint (its progress names the round) resumes it after its last finished epoch.
    """
    import ray
    import ray.train

    _setup(config)
    rank = ray.train.get_context().get_world_rank()
    feeder = config["feeder"]
    resume = _resume_point()
    last: str | None = None
    while True:
        job = ray.get(feeder.next_round.remote(last))
        if job is None:
            return
        round_config = {**config, **job["config"], "round_id": job["id"]}
        at = resume if resume is not None and resume[0] == job["id"] else None
        state, metrics = _train_round(round_config, ray.get(job["data"][0]), at)
        if rank == 0:
            ray.get(feeder.round_done.remote(job["id"], state, metrics))
        last, resume = job["id"], None


def _setup(config: dict[str, Any]) -> None:
    tcfg = TrainerConfig(**config["trainer_config"])
    if tcfg.nice:  # batch work: a request or an ingest poll waiting on this CPU goes first
        os.nice(tcfg.nice)


Resume = tuple[str | None, int, dict[str, torch.Tensor]]  # (round id, next epoch, weights)


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


def _train_round(
    config: dict[str, Any], data: dict[str, Any], resume: Resume | None
) -> tuple[dict[str, Any] | None, dict[str, float]]:
    """Train one round; returns (rank 0: the trained weights as numpy, else None) and the last
    epoch's metrics. Every epoch ends with a checkpointed ``ray.train.report``."""
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
    model = Recommender.from_state(mcfg, data["init_state"])
    teacher = None
    if data.get("teacher_state") is not None:
        teacher = Recommender.from_state(mcfg, data["teacher_state"]).frozen_teacher()

    start_epoch = 0
    if resume is not None:  # a retried round: continue after the last finished epoch
        model = Recommender.from_state(mcfg, resume[2])
        start_epoch = resume[1]

    on_gpu = bool(config["use_gpu"]) and torch.cuda.is_available()
    device = ray.train.torch.get_device() if on_gpu else torch.device("cpu")
    if teacher is not None:
        teacher.to(device)
    # A new engine per round: the item table grows with the catalog, and ZeRO partitions the
    # optimizer state by parameter shape. (The process group, the costly part, stays up.)
    optimizer = torch.optim.AdamW(model.parameters(), lr=tcfg.lr, weight_decay=tcfg.weight_decay)
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, config=deepspeed_config(tcfg, on_gpu)
    )
    shard = Examples(data["inputs"], data["targets"]).shard(rank, world)
    last: dict[str, float] = {"start_epoch": start_epoch, "pid": os.getpid()}  # resumed at the end

    def step(loss: torch.Tensor) -> None:
        engine.backward(loss)
        engine.step()

    def weights() -> dict[str, torch.Tensor]:
        return {k: v.detach().float().cpu().contiguous()
                for k, v in engine.module.state_dict().items()}  # fmt: skip

    def on_epoch(epoch: int, m: dict[str, float]) -> None:
        # Shards are equal, so the round's throughput is this worker's times the world size.
        metrics = {"epoch": epoch, "loss": m["loss"], "samples_per_s": m["samples_per_s"] * world,
                   "start_epoch": start_epoch, "nice": os.nice(0), "pid": os.getpid()}  # fmt: skip
        last.update(metrics)
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = None
            if rank == 0:
                save_file(weights(), str(Path(tmp) / "model.safetensors"))
                progress = {"epoch": epoch, "start_epoch": start_epoch, "round": round_id}
                (Path(tmp) / "progress.json").write_text(json.dumps(progress))
                ckpt = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=ckpt)

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
