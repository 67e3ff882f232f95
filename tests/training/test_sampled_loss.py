"""The sampled softmax: when it is used, and that its log-Q correction points where the full
softmax does."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from training.config import ModelConfig
from training.model import Recommender, sampled_softmax


@pytest.mark.parametrize(
    ("loss", "above", "rows", "sampled"),
    [
        ("auto", 50, 100, True),  # a large catalog
        ("auto", 1_000, 100, False),  # a small one
        ("full", 50, 100, False),
        ("sampled", 1_000, 100, True),
        ("sampled", 1_000, 10, False),  # fewer rows than negatives: nothing to sample
    ],
)
def test_loss_choice(loss: str, above: int, rows: int, sampled: bool) -> None:
    cfg = ModelConfig(loss=loss, sampled_above=above, num_negatives=16)  # type: ignore[arg-type]
    assert Recommender(cfg, rows).samples_loss() is sampled


def _table_grad(loss_of: object, table: torch.Tensor) -> torch.Tensor:
    t = table.clone().requires_grad_(True)
    loss_of(t).backward()  # type: ignore[operator]
    assert t.grad is not None
    return t.grad


def test_corrected_gradient_follows_the_full_softmax() -> None:
    """Half the targets are 9 popular items, so in-batch draws are mostly those. Averaged over
    draws, the corrected sampled loss's gradient on the item table matches the full softmax's,
    popular rows above all; the same draws without the correction push popular rows too hard."""
    torch.manual_seed(0)
    v, n, d = 200, 256, 16
    table = torch.randn(v, d) * 0.5
    targets = torch.cat([torch.randint(1, 10, (n // 2,)), torch.randint(1, v, (n - n // 2,))])
    h = torch.randn(n, d)

    def full(t: torch.Tensor) -> torch.Tensor:
        logits = h @ t.T
        logits[:, 0] = float("-inf")
        return F.cross_entropy(logits, targets)

    def uncorrected(t: torch.Tensor) -> torch.Tensor:  # the same proposal, log-Q left out
        drawn = torch.cat(
            [targets[torch.randint(0, n, (n, 32))], torch.randint(1, v, (n, 32))], dim=1
        )
        pos = (h * t[targets]).sum(-1, keepdim=True)
        neg = torch.einsum("nd,nkd->nk", h, t[drawn])
        neg = neg.masked_fill(drawn == targets[:, None], float("-inf"))
        return F.cross_entropy(torch.cat([pos, neg], 1), torch.zeros(n, dtype=torch.long))

    def averaged(loss: object) -> torch.Tensor:
        torch.manual_seed(1)
        return torch.stack([_table_grad(loss, table) for _ in range(50)]).mean(0)

    def cos(a: torch.Tensor, b: torch.Tensor) -> float:
        return float(F.cosine_similarity(a.flatten(), b.flatten(), dim=0))

    exact = _table_grad(full, table)
    corrected = averaged(lambda t: sampled_softmax(h, targets, t, 64))
    biased = averaged(uncorrected)
    assert cos(exact, corrected) > 0.95
    assert cos(exact[1:10], corrected[1:10]) > 0.99
    assert cos(exact[1:10], biased[1:10]) < 0.95  # what the correction is for
    popular = exact[1:10].norm()
    assert abs(corrected[1:10].norm() - popular) < 0.05 * popular
    assert biased[1:10].norm() > 1.15 * popular


def test_sampled_loss_trains_a_model_on_a_large_catalog() -> None:
    """'auto' on a catalog above its threshold: the loss is finite and a few steps lower it."""
    torch.manual_seed(0)
    cfg = ModelConfig(loss="auto", sampled_above=500, num_negatives=32, dropout=0.0)
    model = Recommender(cfg, 2_000)
    assert model.samples_loss()
    seqs = torch.randint(1, 2_000, (16, 11))
    seqs[:, 1::2] = seqs[:, :1]  # a pattern to learn: every other item repeats the first
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        loss = model.loss(seqs[:, :-1], seqs[:, 1:])
        assert torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.7 * losses[0], losses


def _gathered_reference(h: torch.Tensor, targets: torch.Tensor, table: torch.Tensor, k: int
                        ) -> torch.Tensor:  # fmt: skip
    """The loss written the direct way (every negative's row gathered, log Q over every row)."""
    n, v = len(targets), table.shape[0]
    k_batch, k_uniform = k // 2, k - k // 2
    drawn = torch.cat([targets[torch.randint(0, n, (n, k_batch))],
                       torch.randint(1, v, (n, k_uniform))], dim=1)  # fmt: skip
    share = torch.zeros(v).index_add_(0, targets, torch.full((n,), 1.0 / n))
    log_q = torch.log(k_batch * share + k_uniform / (v - 1))
    pos = (h * table[targets]).sum(-1, keepdim=True)
    neg = torch.einsum("nd,nkd->nk", h, table[drawn]) - log_q[drawn]
    neg = neg.masked_fill(drawn == targets[:, None], float("-inf"))
    return F.cross_entropy(torch.cat([pos, neg], dim=1), torch.zeros(n, dtype=torch.long))


@pytest.mark.parametrize("sparse", [False, True])
def test_scoring_each_target_row_once_gives_the_gathered_loss_and_gradient(sparse: bool) -> None:
    """In-batch negatives scored from the step's distinct target rows: the same draws, logits,
    loss and table gradient as gathering every negative's row (few rows, so uniform draws hit
    targets and their log-Q includes the targets' share)."""
    torch.manual_seed(0)
    h = torch.randn(40, 8)
    targets = torch.randint(1, 12, (40,))
    table = torch.randn(30, 8)
    grads = []
    for product in (False, True):
        t = table.clone().requires_grad_(True)
        torch.manual_seed(1)
        if product:
            loss = sampled_softmax(h, targets, t, 16, sparse=sparse)
        else:
            loss = _gathered_reference(h, targets, t, 16)
        loss.backward()
        assert t.grad is not None
        grads.append((float(loss), t.grad.to_dense()))
    assert grads[0][0] == pytest.approx(grads[1][0], rel=1e-5)
    assert torch.allclose(grads[0][1], grads[1][1], atol=1e-6)
