"""Text-aware item rows (``ModelConfig.item_repr``): every mode trains, ``id`` keeps the weights
format of every earlier version, text modes carry their title features in the weights (strictly
checked), grow with new titles, distil, and place an item known only by its title (no Ray here)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import GPT2Config, GPT2Model

from training.config import ModelConfig
from training.data import left_pad, round_examples
from training.errors import ModelStateError
from training.fit import fit, torch_step
from training.items import TEXT_DIM, TEXT_GAIN
from training.model import Recommender, save_weights
from training.round import prepare_model
from training.textinit import text_rows
from training.vocab import ItemVocab

CFG = ModelConfig(max_len=8, d_model=16, n_layers=2, n_heads=2, text_init=False, dropout=0.0)
TEXT_MODES = ("text", "id+text")
# float32 results of the same math over other shapes or kernels (another CPU, another batch of
# rows) agree to a few ulps of their magnitude, not to torch.allclose's default atol=1e-8.
F32 = {"rtol": 1e-5, "atol": 1e-6}


def cfg(item_repr: str) -> ModelConfig:
    return CFG.model_copy(update={"item_repr": item_repr})


def random_text(n_rows: int, seed: int = 0) -> torch.Tensor:
    t = torch.nn.functional.normalize(torch.randn(n_rows, TEXT_DIM, generator=torch.Generator()
                                                  .manual_seed(seed)), dim=1)  # fmt: skip
    t[0] = 0.0  # padding
    return t


def build(item_repr: str, n_rows: int = 12, seed: int = 0) -> Recommender:
    torch.manual_seed(seed)
    text = random_text(n_rows, seed) if item_repr != "id" else None
    return Recommender(cfg(item_repr), n_rows, text)


def batch(n_rows: int, n: int = 32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    seqs = torch.randint(1, n_rows, (n, CFG.max_len + 1), generator=g)
    return seqs[:, :-1], seqs[:, 1:]


@pytest.mark.parametrize("item_repr", ["id", "text", "id+text"])
def test_each_mode_trains(item_repr: str) -> None:
    model = build(item_repr)
    x, y = batch(model.n_rows)
    step = torch_step(model, 1e-2)
    model.train()
    first = float(model.loss(x, y).detach())
    for _ in range(30):
        step(model.loss(x, y))
    assert float(model.loss(x, y).detach()) < first - 0.3
    assert model.item_embeddings().shape == (12, CFG.d_model)
    assert model.score(x).shape == (32, 12)
    if item_repr == "text":  # no ID row contributes, so none is trained
        assert model.backbone.wte.weight.grad is None
        assert not model.backbone.wte.weight.requires_grad


def test_id_mode_is_todays_model() -> None:
    """Same state-dict keys as a bare GPT-2 under ``backbone.`` (every earlier version loads),
    and the same states as feeding GPT-2 the item ids."""
    model = build("id")
    gpt = GPT2Model(GPT2Config(vocab_size=12, n_positions=CFG.max_len, n_embd=CFG.d_model,
                               n_layer=CFG.n_layers, n_head=CFG.n_heads))  # fmt: skip
    assert set(model.state_dict()) == {f"backbone.{k}" for k in gpt.state_dict()}
    assert not any(k.startswith("items.") for k in model.state_dict())
    gpt.load_state_dict({k.removeprefix("backbone."): v for k, v in model.state_dict().items()})
    model.eval(), gpt.eval()
    x, _ = batch(12)
    x[:, :3] = 0  # left padding
    with torch.no_grad():
        want = gpt(input_ids=x, attention_mask=(x != 0).long()).last_hidden_state
        assert torch.allclose(model.hidden(x), want, atol=1e-6)
    assert model.items is None
    with pytest.raises(ValueError, match="ignore"):
        Recommender(CFG, 12, random_text(12))


@pytest.mark.parametrize("item_repr", TEXT_MODES)
def test_text_modes_round_trip_strictly(item_repr: str, tmp_path: Path) -> None:
    model = build(item_repr)
    path = tmp_path / "m.safetensors"
    save_weights(model, path)
    again = Recommender.from_file(path, cfg(item_repr))
    assert torch.equal(again.items.text, model.items.text)  # type: ignore[union-attr]
    assert torch.equal(again.item_embeddings(), model.item_embeddings())
    state = model.state_dict()
    with pytest.raises(ModelStateError, match=r"Missing.*items\.text"):
        Recommender.from_state(
            cfg(item_repr), {k: v for k, v in state.items() if k != "items.text"}
        )
    with pytest.raises(ModelStateError, match="size mismatch"):
        Recommender.from_state(cfg(item_repr), {**state, "items.text": torch.zeros(12, 100)})
    with pytest.raises(ModelStateError, match="Unexpected"):
        Recommender.from_state(CFG, state)  # an id config cannot silently drop the text
    with pytest.raises(ModelStateError, match="Missing"):
        Recommender.from_state(cfg(item_repr), build("id").state_dict())
    with pytest.raises(ValueError, match="title features"):
        Recommender(cfg(item_repr), 12)
    with pytest.raises(ValueError, match="shape"):
        Recommender(cfg(item_repr), 12, random_text(11))


@pytest.mark.parametrize("item_repr", TEXT_MODES)
def test_grow_keeps_old_rows_and_sets_new_features(item_repr: str) -> None:
    model = build(item_repr)
    x, y = batch(12)
    torch_step(model, 1e-2)(model.loss(x, y))  # trained rows, not just initial ones
    before, text_before = model.item_embeddings().detach().clone(), model.items.text.clone()  # type: ignore[union-attr]
    new_text = random_text(5, seed=7)[:5]
    new_text[2] = 0.0  # an item without a title
    with pytest.raises(ValueError, match="title features"):
        model.grow(17)
    model.grow(17, text=new_text)
    assert model.n_rows == 17
    assert torch.equal(model.items.text[:12], text_before)  # type: ignore[union-attr]
    assert torch.equal(model.items.text[12:], new_text)  # type: ignore[union-attr]
    table = model.item_embeddings().detach()
    # Recomputed over 17 rows instead of 12: float32 matmuls may round differently per shape.
    assert torch.allclose(table[:12], before, **F32)
    # A new item's ID row starts at zero: its row is its title's projection alone.
    assert torch.equal(model.backbone.wte.weight[12:].detach(), torch.zeros(5, CFG.d_model))
    assert model.backbone.wte.weight.requires_grad == (item_repr == "id+text")
    no_title = model.items.proj.bias.detach() * TEXT_GAIN  # type: ignore[union-attr]
    assert torch.allclose(table[14], no_title, **F32)  # an item without a title: the shared bias
    assert not torch.allclose(table[12], table[13])
    model.grow(17, text=None)  # nothing to add: nothing asked for
    again = Recommender.from_state(model.cfg, model.state_dict())
    assert torch.equal(again.item_embeddings(), model.item_embeddings())


@pytest.mark.parametrize("item_repr", TEXT_MODES)
def test_frozen_teacher_in_text_modes(item_repr: str) -> None:
    student = build(item_repr)
    teacher = student.frozen_teacher()
    student.grow(16, text=random_text(4, seed=3))
    x, y = batch(16)  # holds rows 12..15 the teacher never knew
    with torch.no_grad():
        t_logits = teacher.logits(x)
    assert t_logits.shape == (32, CFG.max_len, 12)
    assert all(not p.requires_grad for p in teacher.parameters())
    loss = student.loss(x, y, t_logits, kd_weight=1.0)
    loss.backward()
    assert torch.isfinite(loss)
    assert student.items.proj.weight.grad is not None  # type: ignore[union-attr]
    before = teacher.item_embeddings().clone()
    torch_step(student, 1e-2)(student.loss(x, y, t_logits, kd_weight=1.0))
    assert torch.equal(teacher.item_embeddings(), before)


SPACE = [f"Space battle {k}: starships, aliens and laser guns" for k in range(12)]
COOKING = [f"Cooking show {k}: recipes, baking bread and cakes" for k in range(12)]


@pytest.mark.parametrize("item_repr", TEXT_MODES)
def test_cold_item_known_only_by_its_title_ranks_above_chance(item_repr: str) -> None:
    """Users watch only space films or only cooking shows. A new space film, never seen in
    training, must rank among the space fans' top items (24 candidates, chance = rank 12)."""
    vocab = ItemVocab([f"s{k}" for k in range(12)] + [f"c{k}" for k in range(12)])
    titles = dict(zip(vocab.items(), SPACE + COOKING, strict=True))
    rng = np.random.default_rng(0)
    seqs = {}
    for u in range(60):
        group = range(1, 13) if u % 2 == 0 else range(13, 25)
        seqs[f"u{u}"] = rng.choice(list(group), size=10).tolist()
    ex, _ = round_examples({}, seqs, CFG.max_len, False)
    torch.manual_seed(0)
    model = prepare_model(None, vocab, cfg(item_repr), titles, [])
    fit(model, ex, torch_step(model, 5e-3), 15, 16)
    vocab.add(["s_new"])
    titles["s_new"] = "Space battle 99: starships, aliens and laser guns"
    model = prepare_model(model, vocab, model.cfg, titles, ["s_new"])
    model.eval()
    space_fans = np.stack([left_pad(seqs[f"u{u}"], CFG.max_len) for u in range(0, 60, 2)])
    with torch.no_grad():
        scores = model.score(torch.from_numpy(space_fans))[:, 1:]  # [30, 25] without padding
    new_col = vocab.index("s_new") - 1
    ranks = (scores > scores[:, new_col : new_col + 1]).sum(1).float()  # 0 = top
    # Chance would be 12 on average; 11 or better beats every cooking show (for every fan).
    assert int(ranks.max()) < 12, ranks


def test_prepare_model_grows_text_champion_with_title_features() -> None:
    vocab = ItemVocab(["a", "b", "c"])
    titles = {"a": SPACE[0], "b": COOKING[0], "c": SPACE[1]}
    champion = prepare_model(None, vocab, cfg("id+text"), titles, [])
    assert torch.equal(champion.items.text[0], torch.zeros(TEXT_DIM))  # type: ignore[union-attr]
    assert torch.allclose(
        champion.items.text[1:], text_rows([SPACE[0], COOKING[0], SPACE[1]]), **F32
    )  # type: ignore[union-attr]
    vocab.add(["d", "e"])
    titles["d"] = COOKING[1]  # "e" has no title
    grown = prepare_model(champion, vocab, champion.cfg, titles, ["d", "e"])
    assert grown.n_rows == 6 and champion.n_rows == 4  # the champion itself is left alone
    text = grown.items.text  # type: ignore[union-attr]
    assert torch.equal(text[:4], champion.items.text)  # type: ignore[union-attr]
    assert torch.allclose(text[4], text_rows([COOKING[1]])[0], **F32)
    assert torch.equal(text[5], torch.zeros(TEXT_DIM))
    # The ID path still uses the ridge init from titles when text_init is on.
    id_champ = prepare_model(None, ItemVocab(["a"]), CFG, {}, [])
    assert id_champ.items is None
