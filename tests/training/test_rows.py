"""The item table trained row-wise: when it is, that it learns, that rows no step read keep
their weights exactly, and that workers exchanging sparse rows end with equal tables."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from training import rows
from training.config import ModelConfig
from training.data import Examples
from training.errors import ModelStateError
from training.fit import StepFn, fit, torch_step
from training.model import TABLE, Recommender

N_ROWS = 5_000


def _model(**kw: object) -> Recommender:
    torch.manual_seed(0)
    settings: dict[str, object] = {"loss": "sampled", "num_negatives": 8, "max_len": 8,
                                   "dropout": 0.0, **kw}  # fmt: skip
    cfg = ModelConfig(**settings)  # type: ignore[arg-type]
    return Recommender(cfg, N_ROWS)


def _examples(seed: int, n: int = 64, top: int = 100) -> Examples:
    """Sequences over rows 1..top-1 only: rows past ``top`` are read only as negatives."""
    rng = np.random.default_rng(seed)
    inputs = rng.integers(1, top, size=(n, 8)).astype(np.int64)
    targets = np.roll(inputs, -1, axis=1)
    targets[:, -1] = 0
    return Examples(inputs, targets)


@pytest.mark.parametrize(
    ("kw", "enabled", "distils", "on_gpu", "expected"),
    [
        ({}, True, False, False, True),
        ({}, False, False, False, False),  # turned off
        ({}, True, True, False, False),  # distillation reads the whole table
        ({}, True, False, True, False),  # bf16 weights on a GPU
        ({"loss": "full"}, True, False, False, False),  # a full softmax reads every row
        ({"item_repr": "id+text"}, True, False, False, False),  # a fused table is dense
    ],
)
def test_when_the_table_is_trained_row_wise(
    kw: dict[str, object], enabled: bool, distils: bool, on_gpu: bool, expected: bool
) -> None:
    model = _model(**kw) if "item_repr" not in kw else _text_model()
    assert rows.wanted(model, enabled, distils, on_gpu) is expected


def _text_model() -> Recommender:
    cfg = ModelConfig(loss="sampled", num_negatives=8, max_len=8, item_repr="id+text")
    return Recommender(cfg, N_ROWS, torch.randn(N_ROWS, 384))


def test_rows_apart_refuses_a_full_softmax() -> None:
    with pytest.raises(ValueError, match="sampled loss"):
        _model(loss="full").rows_apart()


def test_row_wise_training_learns_and_leaves_unread_rows_alone() -> None:
    # 2 negatives: 1 in-batch, 1 uniform over the rows, so that many rows stay unread.
    model = _model(num_negatives=2)
    before = model.state_dict()[TABLE].clone()
    table = rows.RowTable(model, weight_decay=0.0, max_norm=1.0)
    assert not model.backbone.wte.weight.requires_grad  # out of the dense optimizer
    ex = _examples(0)
    with torch.no_grad():
        first = float(model.loss(torch.from_numpy(ex.inputs), torch.from_numpy(ex.targets)))
    torch.manual_seed(1)
    out = fit(model, ex, torch_step(model, 1e-2, table=table), epochs=5, batch_size=16)
    model.eval()
    last = float(model.loss(torch.from_numpy(ex.inputs), torch.from_numpy(ex.targets)))
    after = model.state_dict()[TABLE]
    moved = (after != before).any(dim=1)
    assert last < first and np.isfinite(out["loss"])
    assert bool(moved[1:100].all())  # every row the data reads moved
    assert 0 < int(moved[100:].sum()) < N_ROWS - 100  # some negatives moved, not every row


def test_distillation_refuses_a_row_wise_table() -> None:
    model = _model()
    rows.RowTable(model, weight_decay=0.0, max_norm=None)
    ex = _examples(0, n=4)
    x, y = torch.from_numpy(ex.inputs), torch.from_numpy(ex.targets)
    with pytest.raises(ModelStateError, match="dense"):
        model.loss(x, y, torch.zeros(4, 8, N_ROWS), kd_weight=1.0)


def test_merge_averages_the_workers_rows() -> None:
    a = (torch.tensor([3, 1, 3]), torch.tensor([[2.0], [4.0], [1.0]]))  # row 3 read twice
    b = (torch.tensor([3, 5]), torch.tensor([[6.0], [8.0]]))
    merged = rows.merge_rows([a, b])
    assert merged is not None
    assert merged[0].tolist() == [1, 3, 5]
    assert merged[1][:, 0].tolist() == [2.0, 4.5, 4.0]  # (4+0)/2, (2+1+6)/2, (0+8)/2
    assert rows.merge_rows([(torch.zeros(0, dtype=torch.long), torch.zeros(0, 1))]) is None


def _worker(rank: int, init: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    model = _model()
    table = rows.RowTable(model, weight_decay=0.1, max_norm=1.0)
    # Different data per worker, and rank 1's reads rows rank 0's never does.
    ex = _examples(rank, n=32, top=100 + 100 * rank)
    torch.manual_seed(rank)
    fit(model, ex, _synced_step(model, table), epochs=2, batch_size=16)
    torch.save(model.state_dict()[TABLE], os.path.join(out, f"table{rank}.pt"))
    dist.destroy_process_group()


def _synced_step(model: Recommender, table: rows.RowTable) -> StepFn:
    dense = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(dense, lr=1e-2)

    def step(loss: torch.Tensor) -> None:
        opt.zero_grad(set_to_none=True)
        loss.backward()
        table.step(1e-2)
        # (the dense parameters are left unsynced: this test is about the table)

    return step


def test_workers_end_with_equal_tables(tmp_path: Path) -> None:
    init = f"file://{tmp_path / 'rendezvous'}"
    mp.spawn(_worker, args=(init, str(tmp_path)), nprocs=2, join=True)
    t0, t1 = torch.load(tmp_path / "table0.pt"), torch.load(tmp_path / "table1.pt")
    start = _model().state_dict()[TABLE]
    assert torch.equal(t0, t1)
    only_rank1 = [r for r in np.unique(_examples(1, n=32, top=200).inputs) if r >= 100]
    assert only_rank1 and bool((t0[only_rank1] != start[only_rank1]).any(dim=1).all())


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_rows_read_every_step_move_as_adamw_moves_them(weight_decay: float) -> None:
    """Lazy Adam is AdamW on the rows a step read: rows read every step end where AdamW takes
    them, and the rows never read do not move (AdamW's decay would shrink them)."""
    model = _model()
    start = model.state_dict()[TABLE].clone()
    table = rows.RowTable(model, weight_decay, max_norm=None)
    dense = start.clone().requires_grad_()
    adamw = torch.optim.AdamW([dense], lr=1e-2, weight_decay=weight_decay)
    read = torch.tensor([2, 5, 11])
    for i in range(4):
        g = torch.randn(3, start.shape[1], generator=torch.Generator().manual_seed(i))
        table.rows.grad = torch.sparse_coo_tensor(read[None], g, start.shape)
        assert table.step(1e-2) == 3
        dense.grad = torch.zeros_like(start).index_copy_(0, read, g)
        adamw.step()
    after = model.state_dict()[TABLE]
    assert torch.allclose(after[read], dense.detach()[read], rtol=1e-5, atol=1e-6)
    others = torch.ones(len(start), dtype=torch.bool).index_fill_(0, read, False)
    assert torch.equal(after[others], start[others])
