"""The training loop core, shared by the Ray Train + DeepSpeed workers and in-process runs.

``fit`` owns batching, shuffling and the loss (with optional distillation from a teacher); the
caller owns the optimizer step (a DeepSpeed engine's backward/step, or a plain torch optimizer).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import torch

from training.data import Examples
from training.model import Recommender

StepFn = Callable[[torch.Tensor], None]


def fit(
    model: Recommender,
    examples: Examples,
    step: StepFn,
    epochs: int,
    batch_size: int,
    seed: int = 0,
    teacher: Recommender | None = None,
    kd_weight: float = 0.0,
    kd_temperature: float = 2.0,
    start_epoch: int = 0,
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
    device: torch.device | None = None,
) -> dict[str, float]:
    """Train for ``epochs - start_epoch`` epochs; returns loss and samples/s of the last epoch."""
    n = len(examples)
    if n == 0:
        raise ValueError("no training examples: the round has no new events with a next item")
    inputs = torch.from_numpy(examples.inputs)
    targets = torch.from_numpy(examples.targets)
    if teacher is not None:
        teacher.eval()
    last = {"loss": float("nan"), "samples_per_s": 0.0, "epochs": float(epochs)}
    for epoch in range(start_epoch, epochs):
        model.train()
        order = torch.from_numpy(np.random.default_rng(seed + epoch).permutation(n))
        total, steps, t0 = 0.0, 0, time.perf_counter()
        for s in range(0, n, batch_size):
            idx = order[s : s + batch_size]
            x, y = inputs[idx], targets[idx]
            if device is not None:
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            t_logits = None
            if teacher is not None and kd_weight > 0:
                with torch.no_grad():
                    t_logits = teacher.logits(x)  # [B, L, V_old]
            loss = model.loss(x, y, t_logits, kd_weight, kd_temperature)
            step(loss)
            total += float(loss.detach())
            steps += 1
        dt = time.perf_counter() - t0
        last = {"loss": total / steps, "samples_per_s": n / dt, "epochs": float(epoch + 1)}
        if on_epoch is not None:
            on_epoch(epoch, last)
    return last


def torch_step(model: Recommender, lr: float, weight_decay: float = 0.0) -> StepFn:
    """A plain AdamW step, for in-process training (benchmarks, tests)."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)

    def step(loss: torch.Tensor) -> None:
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step
