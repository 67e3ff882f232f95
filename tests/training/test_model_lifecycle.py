"""The model's own lifecycle: strict rebuilds, safetensors files, frozen teachers, and
distillation from a teacher that knows fewer items than the grown student (no Ray here; the
real Ray Train + DeepSpeed distillation round is in test_training_round.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from training.config import ModelConfig
from training.data import Examples
from training.errors import ModelStateError
from training.fit import fit, torch_step
from training.model import Recommender, Teacher, load_weights, save_weights

CFG = ModelConfig(max_len=8, d_model=16, n_heads=2, text_init=False)


def test_from_state_is_strict_and_takes_numpy() -> None:
    torch.manual_seed(0)
    model = Recommender(CFG, 12)
    again = Recommender.from_state(CFG, model.state_numpy())
    for (k, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items(), strict=True):
        assert torch.equal(a, b), k
    state = model.state_dict()
    with pytest.raises(ModelStateError, match="Missing"):
        Recommender.from_state(CFG, {k: v for k, v in state.items() if "ln_f" not in k})
    with pytest.raises(ModelStateError, match="Unexpected"):
        Recommender.from_state(CFG, {**state, "extra.weight": torch.zeros(1)})
    with pytest.raises(ModelStateError, match="size mismatch"):
        Recommender.from_state(CFG.model_copy(update={"max_len": 16}), state)
    with pytest.raises(ModelStateError, match="item table"):
        Recommender.from_state(CFG, {})


def test_from_file_and_load_weights(tmp_path: Path) -> None:
    model = Recommender(CFG, 12)
    save_weights(model, tmp_path / "m.safetensors")
    back = Recommender.from_file(tmp_path / "m.safetensors", CFG)
    assert torch.equal(back.item_embeddings(), model.item_embeddings())
    grown = load_weights(tmp_path / "m.safetensors", CFG, n_rows=15)
    assert grown.n_rows == 15
    assert torch.equal(grown.item_embeddings()[:12], model.item_embeddings())


def test_frozen_teacher_is_a_frozen_independent_copy() -> None:
    model = Recommender(CFG, 12)
    teacher = model.frozen_teacher()
    assert isinstance(teacher, Teacher)
    assert not any(p.requires_grad for p in teacher.parameters())
    teacher.train()
    assert not teacher.training  # stays in eval mode: no dropout in the targets
    with torch.no_grad():
        model.item_embeddings().add_(1.0)
    assert not torch.equal(teacher.item_embeddings(), model.item_embeddings())


def _examples(n_rows: int, n: int = 64, seed: int = 0) -> Examples:
    rng = np.random.default_rng(seed)
    seq = rng.integers(1, n_rows, size=(n, CFG.max_len + 1))
    return Examples(seq[:, :-1].copy(), seq[:, 1:].copy())


def test_distillation_with_a_grown_catalog_trains_without_crashing() -> None:
    torch.manual_seed(0)
    champion = Recommender(CFG, 12)
    student = Recommender.from_state(CFG, champion.state_dict())
    student.grow(20)  # this round adds items 12..19
    ex = _examples(20)
    assert (ex.inputs >= 12).any()  # the teacher will see rows it never knew
    plain = Recommender.from_state(CFG, champion.state_dict())
    with pytest.raises(IndexError):  # what the workers hit before: a plain copy as teacher
        plain.logits(torch.from_numpy(ex.inputs))
    teacher = champion.frozen_teacher()
    out = fit(student, ex, torch_step(student, 1e-3), epochs=1, batch_size=16,
              teacher=teacher, kd_weight=0.5)  # fmt: skip
    assert np.isfinite(out["loss"])


def test_distillation_term_leaves_new_rows_out() -> None:
    torch.manual_seed(0)
    champion = Recommender(CFG, 12)
    student = Recommender.from_state(CFG, champion.state_dict())
    student.grow(20)
    with torch.no_grad():  # a student that disagrees with its teacher
        student.backbone.ln_f.weight.mul_(1.5)
    student.eval()  # no dropout: the two losses differ only by the distillation term
    # Inputs of known items only (as context, new rows would get gradient through the input
    # embedding, legitimately); targets include new items.
    ex = _examples(20, n=16, seed=1)
    x, y = torch.from_numpy(ex.inputs % 11 + 1), torch.from_numpy(ex.targets)
    with torch.no_grad():
        t_logits = champion.frozen_teacher().logits(x)
    assert t_logits.shape[-1] == 12
    kd = student.loss(x, y, t_logits, kd_weight=1.0) - student.loss(x, y)
    assert float(kd.detach()) > 0
    kd.backward()
    grad = student.item_embeddings().grad
    assert grad is not None
    assert torch.all(grad[12:] == 0)  # rows new this round get nothing from the teacher
    assert torch.any(grad[1:12] != 0)


@pytest.mark.parametrize("layers,item_repr", [(1, "id"), (2, "id"), (2, "id+text"), (1, "text")])
def test_score_computes_the_full_forwards_last_position(layers: int, item_repr: str) -> None:
    """``score`` runs the last block for the newest position only: the same scores as the
    transformers forward over every position (float32 rounding aside), padding and short
    histories included; a teacher still reads rows it never knew as padding."""
    torch.manual_seed(layers)
    cfg = CFG.model_copy(update={"n_layers": layers, "item_repr": item_repr})
    text = torch.randn(30, 384) if item_repr != "id" else None
    model = Recommender(cfg, 30, text).eval()
    x = torch.randint(1, 30, (64, CFG.max_len))
    lengths = torch.randint(1, CFG.max_len + 1, (64,))
    x[torch.arange(CFG.max_len)[None, :] < (CFG.max_len - lengths)[:, None]] = 0  # left padding
    with torch.no_grad():
        table = model.item_embeddings()
        full = model._hidden(x, table)[:, -1] @ table.T
        got = model.score(x)
    assert torch.allclose(got[:, 1:], full[:, 1:], atol=1e-5, rtol=1e-4)
    assert torch.isinf(got[:, 0]).all()
    teacher = Recommender(cfg, 20, text[:20] if text is not None else None).frozen_teacher()
    with torch.no_grad():
        known = torch.where(x < 20, x, torch.zeros_like(x))
        assert torch.allclose(teacher.score(x), teacher.score(known))


@pytest.mark.parametrize("layers,item_repr", [(1, "id"), (2, "id+text")])
def test_serving_scorer_is_score_at_any_batch_size(layers: int, item_repr: str) -> None:
    """The traced scorer gives ``score``'s results for batches of another size than the one it
    was traced with, padding and one-item histories included."""
    torch.manual_seed(layers)
    cfg = CFG.model_copy(update={"n_layers": layers, "item_repr": item_repr})
    text = torch.randn(30, 384) if item_repr != "id" else None
    model = Recommender(cfg, 30, text)
    scorer = model.serving_scorer()
    assert not model.training
    for b in (1, 3, 17):
        x = torch.randint(1, 30, (b, CFG.max_len))
        x[-1, :-1] = 0  # one item only
        with torch.inference_mode():
            want, got = model.score(x), scorer(x)
        assert got.shape == (b, 30)
        assert torch.allclose(got[:, 1:], want[:, 1:], atol=1e-6, rtol=1e-5)
        assert torch.isinf(got[:, 0]).all()


def test_versions_of_one_shape_share_the_trace_and_keep_their_own_weights() -> None:
    """A second version (other weights, a grown catalog) reuses the first one's graph and scores
    with its own tensors; the first keeps scoring as before."""
    torch.manual_seed(3)
    a, b = Recommender(CFG, 30), Recommender(CFG, 45)
    score_a, score_b = a.serving_scorer(), b.serving_scorer()
    x = torch.randint(1, 30, (4, CFG.max_len))
    with torch.inference_mode():
        assert torch.allclose(score_b(x)[:, 1:], b.score(x)[:, 1:], atol=1e-6, rtol=1e-5)
        assert torch.allclose(score_a(x)[:, 1:], a.score(x)[:, 1:], atol=1e-6, rtol=1e-5)
        assert score_b(x).shape == (4, 45)
