"""What each Ray Train worker runs in a round: DeepSpeed data parallelism over its shard.

The driver (training/round.py) puts the round's examples and starting weights in Ray's object store
and passes their refs in ``config``; nothing here knows about Kafka or the registry. Each epoch ends
with a checkpoint (rank 0 writes consolidated safetensors; ZeRO-2 shards only optimizer state and
gradients, so rank 0's module holds the full weights), so a retried round resumes from the last
finished epoch instead of starting over.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

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


def _model_from_state(cfg: ModelConfig, state: dict[str, np.ndarray]) -> Recommender:
    tensors = {k: torch.from_numpy(v) for k, v in state.items()}
    model = Recommender(cfg, int(tensors["backbone.wte.weight"].shape[0]))
    model.load_state_dict(tensors, strict=False)
    return model


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
    data = ray.get(config["data_ref"])
    torch.manual_seed(tcfg.seed)
    model = _model_from_state(mcfg, data["init_state"])
    teacher = _model_from_state(mcfg, data["teacher_state"]) if data.get("teacher_state") else None

    start_epoch = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:  # a retried round: continue after the last finished epoch
        with checkpoint.as_directory() as d:
            model.load_state_dict(load_file(str(Path(d) / "model.safetensors")), strict=False)
            start_epoch = json.loads((Path(d) / "progress.json").read_text())["epoch"] + 1

    on_gpu = bool(config["use_gpu"]) and torch.cuda.is_available()
    device = ray.train.torch.get_device() if on_gpu else torch.device("cpu")
    if teacher is not None:
        teacher.to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=tcfg.lr, weight_decay=tcfg.weight_decay)
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, config=deepspeed_config(tcfg, on_gpu)
    )
    inputs, targets = data["inputs"], data["targets"]
    mine = np.arange(rank, len(inputs), world)  # this worker's shard
    shard = Examples(inputs[mine], targets[mine])

    def step(loss: torch.Tensor) -> None:
        engine.backward(loss)
        engine.step()

    fail_at = config.get("fail_at_epoch")
    marker = config.get("fail_marker")

    def on_epoch(epoch: int, m: dict[str, float]) -> None:
        dying = fail_at is not None and epoch == fail_at and rank == world - 1
        if dying and marker and not os.path.exists(marker):  # die once, like a lost node
            Path(marker).write_text("died")
            os._exit(1)
        # Shards are equal, so the round's throughput is this worker's times the world size.
        metrics = {"epoch": epoch, "loss": m["loss"], "samples_per_s": m["samples_per_s"] * world}
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = None
            if rank == 0:
                state = {k: v.detach().float().cpu().contiguous()
                         for k, v in engine.module.state_dict().items()}  # fmt: skip
                save_file(state, str(Path(tmp) / "model.safetensors"))
                (Path(tmp) / "progress.json").write_text(json.dumps({"epoch": epoch}))
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
