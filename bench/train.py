"""Training throughput: the DeepSpeed round against a plain torch DDP loop, in one run.

    python -m bench.train [--quick] [--workers N] [--epochs E]

Both run under the same Ray Train ``TorchTrainer`` with the same workers, model (the default
``ModelConfig``), data (MovieLens-100K as next-item training windows, sharded by rank), batch
size, seed and loss (``training.fit``). Only the data-parallel engine differs:

- deepspeed: ``deepspeed.initialize`` with the production config (``training.worker``: ZeRO
  stage 2, bf16 on GPU, fp32 on CPU), ``engine.backward`` / ``engine.step``;
- ddp: ``torch.nn.parallel.DistributedDataParallel`` via ``ray.train.torch.prepare_model`` and a
  torch AdamW step.

Throughput is samples/s over all workers, from the epochs after the first (the first pays for
allocator and communicator warm-up). Ray Train's fixed cost per round is the time from
``trainer.fit()`` to the first optimizer step on rank 0.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any, cast

import numpy as np
import pyarrow as pa
import torch
from rich.console import Console
from rich.table import Table

from harness.sigterm import exit_on_sigterm
from streams.datasets import DEFAULT_ML100K, movielens_100k
from training.config import ModelConfig, TrainerConfig
from training.data import Examples, round_examples, user_sequences
from training.model import Recommender
from training.round_train import set_poll_interval
from training.vocab import ItemVocab

console = Console(stderr=True)
OUT = Console(width=130)  # tables for logs, not an 80-column terminal


class Objective(torch.nn.Module):
    """The model's loss as ``forward``, so DDP's forward hooks see every step."""

    def __init__(self, model: Recommender) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.model.loss(x, y, None, 0.0, 2.0)


class ThroughDDP:
    """What ``training.fit`` calls on a model (train, loss), routed through the DDP wrapper."""

    def __init__(self, ddp: torch.nn.Module) -> None:
        self.ddp = ddp

    def train(self) -> None:
        self.ddp.train()

    def loss(self, x: torch.Tensor, y: torch.Tensor, *_: Any) -> torch.Tensor:
        out: torch.Tensor = self.ddp(x, y)
        return out


def bench_loop(config: dict[str, Any]) -> None:
    import deepspeed
    import ray
    import ray.train
    import ray.train.torch

    from training.fit import fit
    from training.worker import deepspeed_config, skip_inference_kernel

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    tcfg = TrainerConfig(**config["trainer_config"])
    data = ray.get(config["data_ref"])
    torch.manual_seed(tcfg.seed)
    model = Recommender(ModelConfig(**config["model_config"]), data["n_rows"])
    on_gpu = bool(config["use_gpu"]) and torch.cuda.is_available()
    device = ray.train.torch.get_device() if on_gpu else torch.device("cpu")
    first_step: list[float] = []

    if config["engine"] == "deepspeed":
        skip_inference_kernel()  # as the product's workers
        optimizer = torch.optim.AdamW(model.parameters(), lr=tcfg.lr)
        engine, _, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=deepspeed_config(tcfg, on_gpu)
        )
        target: Any = engine.module

        def step(loss: torch.Tensor) -> None:
            engine.backward(loss)
            engine.step()
            if not first_step:
                first_step.append(time.time())
    else:
        ddp = ray.train.torch.prepare_model(Objective(model))
        optimizer = torch.optim.AdamW(ddp.parameters(), lr=tcfg.lr)
        target = ThroughDDP(ddp)

        def step(loss: torch.Tensor) -> None:
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if not first_step:
                first_step.append(time.time())

    inputs, targets = data["inputs"], data["targets"]
    mine = np.arange(rank, len(inputs), world)
    rates: list[float] = []
    fit(
        cast(Recommender, target),
        Examples(inputs[mine], targets[mine]),
        step,
        epochs=tcfg.epochs,
        batch_size=tcfg.batch_size,
        seed=tcfg.seed + rank,
        on_epoch=lambda e, m: rates.append(m["samples_per_s"] * world),
        device=device,
    )
    steady = rates[1:] or rates
    metrics = {"samples_per_s": float(np.mean(steady)), "first_step_at": first_step[0]}
    # Ray Train V2 keeps only metrics that come with a checkpoint: attach a tiny one on rank 0.
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "metrics.json").write_text(json.dumps(metrics))
        ckpt = ray.train.Checkpoint.from_directory(tmp) if rank == 0 else None
        ray.train.report(metrics, checkpoint=ckpt)


def examples() -> tuple[Examples, int]:
    events = movielens_100k(DEFAULT_ML100K, with_titles=False)
    vocab = ItemVocab()
    vocab.add(e.item_id for e in events)
    table = pa.table(
        {"user_id": [e.user_id for e in events], "item_id": [e.item_id for e in events]}
    )
    ex, _ = round_examples({}, user_sequences(table, vocab), ModelConfig().max_len, holdout=False)
    return ex, len(vocab)


def run_engine(engine: str, ex: Examples, n_rows: int, tcfg: TrainerConfig) -> dict[str, float]:
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    use_gpu = ray.cluster_resources().get("GPU", 0) >= tcfg.num_workers
    data_ref = ray.put({"inputs": ex.inputs, "targets": ex.targets, "n_rows": n_rows})
    set_poll_interval(tcfg)  # as the product's runs
    trainer = TorchTrainer(
        bench_loop,
        train_loop_config={
            "engine": engine,
            "data_ref": data_ref,
            "model_config": ModelConfig().model_dump(),
            "trainer_config": tcfg.model_dump(mode="json"),
            "use_gpu": use_gpu,
        },
        scaling_config=ScalingConfig(num_workers=tcfg.num_workers, use_gpu=use_gpu),
        run_config=RunConfig(
            name=f"bench-{engine}-{time.time_ns()}", storage_path=tempfile.mkdtemp()
        ),
    )
    t0 = time.time()
    result = trainer.fit()
    wall = time.time() - t0
    m = result.metrics or {}
    return {
        "samples_per_s": float(m["samples_per_s"]),
        "fixed_cost_s": float(m["first_step_at"]) - t0,
        "wall_s": wall,
        "gpu": float(use_gpu),
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.train", description=__doc__.split("\n")[0])
    p.add_argument("--workers", type=int, default=2, help="Ray Train workers")
    p.add_argument("--epochs", type=int, default=3, help="epochs per run (first = warm-up)")
    p.add_argument("--batch-size", type=int, default=128, help="sequences per worker per step")
    p.add_argument("--quick", action="store_true", help="2 epochs on a third of the data")
    a = p.parse_args(argv)
    if a.workers < 1 or a.epochs < 1:
        p.error("--workers and --epochs must be at least 1")
    import ray

    ray.init(num_cpus=max(a.workers, 2), include_dashboard=False, log_to_driver=False)
    exit_on_sigterm()  # Ray's handler would end us with no clean-up
    ex, n_rows = examples()
    if a.quick:
        ex = Examples(ex.inputs[: len(ex) // 3], ex.targets[: len(ex) // 3])
    epochs = 2 if a.quick else a.epochs
    tcfg = TrainerConfig(num_workers=a.workers, epochs=epochs, batch_size=a.batch_size,
                         storage_path=Path(tempfile.mkdtemp()))  # fmt: skip
    res: dict[str, list[dict[str, float]]] = {}
    for engine in ("ddp", "deepspeed", "ddp", "deepspeed"):  # interleaved: noise hits both
        console.print(f"{engine}: {len(ex):,} windows, {a.workers} workers, {epochs} epochs")
        r = run_engine(engine, ex, n_rows, tcfg)
        res.setdefault(engine, []).append(r)
    ray.shutdown()
    best = {k: max(v, key=lambda r: r["samples_per_s"]) for k, v in res.items()}
    table = Table(title=f"Training throughput, {a.workers} workers, same model/data/batch")
    for col in ("engine", "samples/s (2 runs)", "fixed cost s", "wall s"):
        table.add_column(col, justify="right")
    for k, runs in res.items():
        table.add_row(
            k,
            " / ".join(f"{r['samples_per_s']:,.0f}" for r in runs),
            " / ".join(f"{r['fixed_cost_s']:.1f}" for r in runs),
            " / ".join(f"{r['wall_s']:.1f}" for r in runs),
        )
    OUT.print(table)
    ratio = best["deepspeed"]["samples_per_s"] / best["ddp"]["samples_per_s"]
    OUT.print(f"deepspeed / ddp throughput: {ratio:.2f} (goal >= 0.9)")
    record = {
        "bench": "train",
        "workers": a.workers,
        "windows": len(ex),
        "epochs": epochs,
        "gpu": bool(best["deepspeed"]["gpu"]),
        "deepspeed_samples_per_s": round(best["deepspeed"]["samples_per_s"], 1),
        "ddp_samples_per_s": round(best["ddp"]["samples_per_s"], 1),
        "ratio": round(ratio, 3),
        "ray_fixed_cost_s": round(
            float(np.median([r["fixed_cost_s"] for v in res.values() for r in v])), 2
        ),
        "goal_ratio_ge_0_9": ratio >= 0.9,
    }
    print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
