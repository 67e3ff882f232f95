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
from training.fit import fit
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
    import deepspeed
    import ray
    import ray.train
    import ray.train.torch

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    mcfg = ModelConfig(**config["model_config"])
    tcfg = TrainerConfig(**config["trainer_config"])
    rcfg = ReplayConfig(**config["replay_config"])
    if tcfg.nice:  # batch work: a request or an ingest poll waiting on this CPU goes first
        os.nice(tcfg.nice)
    data = ray.get(config["data_ref"])
    torch.manual_seed(tcfg.seed)
    model = Recommender.from_state(mcfg, data["init_state"])
    teacher = None
    if data.get("teacher_state") is not None:
        teacher = Recommender.from_state(mcfg, data["teacher_state"]).frozen_teacher()

    start_epoch = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:  # a retried round: continue after the last finished epoch
        with checkpoint.as_directory() as d:
            model = Recommender.from_file(Path(d) / "model.safetensors", mcfg)
            start_epoch = json.loads((Path(d) / "progress.json").read_text())["epoch"] + 1

    on_gpu = bool(config["use_gpu"]) and torch.cuda.is_available()
    device = ray.train.torch.get_device() if on_gpu else torch.device("cpu")
    if teacher is not None:
        teacher.to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=tcfg.lr, weight_decay=tcfg.weight_decay)
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, config=deepspeed_config(tcfg, on_gpu)
    )
    shard = Examples(data["inputs"], data["targets"]).shard(rank, world)

    def step(loss: torch.Tensor) -> None:
        engine.backward(loss)
        engine.step()

    def on_epoch(epoch: int, m: dict[str, float]) -> None:
        # Shards are equal, so the round's throughput is this worker's times the world size.
        metrics = {"epoch": epoch, "loss": m["loss"], "samples_per_s": m["samples_per_s"] * world,
                   "start_epoch": start_epoch, "nice": os.nice(0)}  # fmt: skip
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = None
            if rank == 0:
                state = {k: v.detach().float().cpu().contiguous()
                         for k, v in engine.module.state_dict().items()}  # fmt: skip
                save_file(state, str(Path(tmp) / "model.safetensors"))
                progress = {"epoch": epoch, "start_epoch": start_epoch}
                (Path(tmp) / "progress.json").write_text(json.dumps(progress))
                ckpt = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=ckpt)

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
    )
