"""The item table trained row by row, for catalogs too large to update whole every step.

With the sampled softmax (``ModelConfig.loss``), a step reads the rows of its inputs, its targets
and their negatives: a few hundred thousand of a million-row table at most. A dense optimizer
still pays for every row every step: the table's full gradient, its reduction between the
workers (ZeRO-2's reduce and gather over gloo) and AdamW's update of every row. At 1M items this
held a round to 21 samples/s against 1,311 at 10k (docs/benchmarks.md, 2026-12-05).

``RowTable`` takes the table out of the dense optimizer (``Recommender.rows_apart``), gathers the
workers' sparse gradients (the rows each touched and their values; no worker's rows are dropped
or counted twice), averages them as ZeRO averages the dense ones, clips their norm as DeepSpeed
clips the dense ones', and applies lazy Adam: moments and weights move only for rows a step
touched. Rows no step reads keep their weights exactly, and weight decay, when asked for, reaches
the touched rows only.

Every worker applies the same averaged rows to the same starting table, so the tables stay equal
without a broadcast, as ZeRO's gathered weights do.
"""

from __future__ import annotations

from typing import Any

import torch

from training.config import TrainerConfig
from training.model import Recommender


def wanted(model: Recommender, enabled: bool, distils: bool, on_gpu: bool) -> bool:
    """Whether a run should train ``model``'s item table row-wise: asked for
    (``TrainerConfig.row_wise_table``), a sampled loss over ID rows, no distillation (its term
    reads the whole table) and float32 weights (a GPU run's bf16 weights would take lazy Adam's
    small updates at bf16's precision; there a dense update of the table is cheap anyway)."""
    return (
        enabled
        and not distils
        and not on_gpu
        and model.samples_loss()
        and model.cfg.item_repr == "id"
    )


def optimizers(
    model: Recommender,
    tcfg: TrainerConfig,
    distils: bool = False,
    on_gpu: bool = False,
    max_norm: float | None = None,
) -> tuple[torch.optim.AdamW, RowTable | None]:
    """A run's optimizers: AdamW over the dense parameters, and the item table's ``RowTable``
    when ``wanted`` (then AdamW leaves the table out). Call before DeepSpeed wraps the model."""
    table = None
    if wanted(model, tcfg.row_wise_table, distils, on_gpu):
        table = RowTable(model, tcfg.weight_decay, max_norm)
    return dense_adamw(model, tcfg.lr, tcfg.weight_decay), table


def dense_adamw(model: Recommender, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW over the parameters that take gradients (the item table not, once set apart)."""
    return torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=weight_decay
    )


class RowTable:
    """Lazy Adam over ``model``'s item table; ``step`` after every backward, before the dense
    optimizer's step (whose learning rate it follows).

    Adam's arithmetic exactly (``torch.optim.Adam``, decoupled decay as AdamW's) on the touched
    rows, with the run's step count for bias correction. Written out over row indices because
    ``torch.optim.SparseAdam`` spent 40 ms a step on 40k touched rows of 1M (sparse adds and
    masks), this 22 ms (one thread).
    """

    BETAS = (0.9, 0.999)  # torch's Adam defaults, as the dense AdamW's
    EPS = 1e-8

    def __init__(
        self, model: Recommender, weight_decay: float, max_norm: float | None, group: Any = None
    ) -> None:
        self.rows = model.rows_apart()
        self.exp_avg = torch.zeros_like(self.rows, requires_grad=False)
        self.exp_avg_sq = torch.zeros_like(self.rows, requires_grad=False)
        self.steps = 0
        self.weight_decay = weight_decay
        self.max_norm = max_norm
        self.group = group  # a torch.distributed group; None = the default one, if initialised

    @torch.no_grad()
    def step(self, lr: float) -> int:
        """Apply this step's gradient; returns how many rows it moved (0 if it read none)."""
        grad = self.rows.grad
        self.rows.grad = None
        merged = gather_rows(grad, self.rows.shape, self.group)
        if merged is None:
            return 0
        touched, g = merged
        if self.max_norm is not None:
            norm = float(g.norm())
            if norm > self.max_norm:
                g = g * (self.max_norm / norm)
        self.steps += 1
        b1, b2 = self.BETAS
        m = self.exp_avg.index_select(0, touched).lerp_(g, 1 - b1)
        v = self.exp_avg_sq.index_select(0, touched).mul_(b2).addcmul_(g, g, value=1 - b2)
        self.exp_avg.index_copy_(0, touched, m)
        self.exp_avg_sq.index_copy_(0, touched, v)
        update = m.div_(v.div_(1 - b2**self.steps).sqrt_().add_(self.EPS))
        step_size = lr / (1 - b1**self.steps)
        if self.weight_decay:
            kept = self.rows.index_select(0, touched).mul_(1 - lr * self.weight_decay)
            self.rows.index_copy_(0, touched, kept.sub_(update, alpha=step_size))
        else:
            self.rows.index_add_(0, touched, update, alpha=-step_size)
        return int(touched.numel())


Rows = tuple[torch.Tensor, torch.Tensor]  # (row ids [R], values [R, D])


def gather_rows(grad: torch.Tensor | None, shape: torch.Size, group: Any = None) -> Rows | None:
    """The workers' sparse gradients of the table, merged and averaged over the workers: each
    touched row once with its summed values, or None if no worker touched a row."""
    import torch.distributed as dist

    if grad is None:  # this worker's step read no row: it still takes part in any exchange
        rows, values = torch.zeros(0, dtype=torch.long), torch.zeros(0, shape[1])
    else:
        # As autograd accumulated them (a row once per read): most reads are distinct rows on a
        # large catalog, so summing them here would cost a sort and save few bytes; the merge
        # sums once for every worker's.
        rows, values = grad._indices()[0], grad._values()
    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        return merge_rows([(rows, values)])
    world = dist.get_world_size(group)
    sizes = [torch.zeros(1, dtype=torch.long) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([rows.numel()]), group=group)
    counts = [int(s.item()) for s in sizes]
    # Ids and values travel as one byte matrix, a row per read: one exchange per step, not two.
    packed = torch.cat(
        [rows.reshape(-1, 1).view(torch.uint8), values.contiguous().view(torch.uint8)], 1
    )
    padded = packed.new_zeros(max(counts), packed.shape[1])
    padded[: rows.numel()] = packed
    gathered = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(gathered, padded, group=group)
    id_bytes = rows.element_size()
    parts = [
        (g[:n, :id_bytes].contiguous().view(rows.dtype).reshape(-1),
         g[:n, id_bytes:].contiguous().view(values.dtype))
        for g, n in zip(gathered, counts, strict=True)
    ]  # fmt: skip
    return merge_rows(parts)


def merge_rows(parts: list[Rows]) -> Rows | None:
    """Sum the workers' (rows, values) into each row once, divided by the number of workers
    (the mean gradient, as a dense reduction gives); rows ascending.

    ``unique`` and ``index_add_`` rather than a sparse tensor's ``coalesce``: the same sums,
    without permuting the values (22 against 40 ms for 200k reads of 1M rows, one thread)."""
    rows = torch.cat([r for r, _ in parts])
    if rows.numel() == 0:
        return None
    values = torch.cat([v for _, v in parts])
    touched, at = torch.unique(rows, return_inverse=True)
    summed = values.new_zeros(len(touched), values.shape[1]).index_add_(0, at, values)
    if len(parts) > 1:
        summed.div_(len(parts))
    return touched, summed
