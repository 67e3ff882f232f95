"""The training loop core, shared by the Ray Train + DeepSpeed workers and in-process runs.

``fit`` owns batching, shuffling and the loss (with optional distillation from a teacher); the
caller owns the optimizer step (a DeepSpeed engine's backward/step, or a plain torch optimizer).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from training.data import Examples
from training.model import Recommender
from training.rows import RowTable, dense_adamw

StepFn = Callable[[torch.Tensor], None]


@dataclass(frozen=True)
class LrSchedule:
    """Linear warm-up to ``peak`` over ``warmup_steps``, then constant or cosine-decayed to
    ``floor * peak`` at ``total_steps``.

    The warm-up matters most for a warm-started round: a fresh AdamW's first updates are about
    ``lr`` in size whatever the gradient (its moment estimates start at zero), which knocks a
    converged model off its optimum before the round's data can steer it.
    """

    peak: float
    total_steps: int
    warmup_steps: int = 0
    decay: str = "cosine"  # or "constant"
    floor: float = 0.0

    @classmethod
    def for_run(
        cls, peak: float, n: int, batch_size: int, epochs: int, warmup_epochs: float, decay: str
    ) -> LrSchedule:
        steps = math.ceil(n / batch_size)
        return cls(peak, steps * epochs, min(steps * epochs, round(warmup_epochs * steps)), decay)

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.peak * (step + 1) / self.warmup_steps
        if self.decay == "constant":
            return self.peak
        done = (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps)
        cos = 0.5 * (1.0 + math.cos(math.pi * min(1.0, done)))
        return self.peak * (self.floor + (1.0 - self.floor) * cos)


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
    on_epoch: Callable[[int, dict[str, float]], bool | None] | None = None,
    device: torch.device | None = None,
    schedule: LrSchedule | None = None,
    optimizer: torch.optim.Optimizer | None = None,
) -> dict[str, float]:
    """Train for ``epochs - start_epoch`` epochs; returns loss and samples/s of the last epoch.

    ``on_epoch`` returning True stops training after that epoch (early stopping on validation).
    With ``schedule``, every step first sets ``optimizer``'s learning rate to the schedule's
    value at the run's global step (a resumed run picks up where its epoch began).
    """
    if (schedule is None) != (optimizer is None):
        raise ValueError("a learning-rate schedule needs the optimizer it sets, and vice versa")
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
        first_step = epoch * math.ceil(n / batch_size)
        for s in range(0, n, batch_size):
            if schedule is not None and optimizer is not None:
                lr = schedule(first_step + steps)
                for group in optimizer.param_groups:
                    group["lr"] = lr
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
        last = {"loss": total / steps, "samples_per_s": n / dt, "epochs": float(epoch + 1),
                "seconds": dt}  # fmt: skip
        if on_epoch is not None and on_epoch(epoch, last):
            break
    return last


def torch_step(
    model: Recommender,
    lr: float,
    weight_decay: float = 0.0,
    opt: torch.optim.Optimizer | None = None,
    table: RowTable | None = None,
) -> StepFn:
    """A plain AdamW step (or ``opt``'s), for in-process training (a recipe search, benchmarks,
    tests); with ``table``, the item table's rows step too, at ``opt``'s learning rate."""
    if opt is None:
        opt = dense_adamw(model, lr, weight_decay)

    def step(loss: torch.Tensor) -> None:
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if table is not None:
            table.step(opt.param_groups[0]["lr"])
        opt.step()

    return step
