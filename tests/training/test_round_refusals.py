"""run_round's refusals, without Ray: the training step is replaced from outside (monkeypatch) so
each test can hand the round the candidate it needs: a NaN model, a lineage the registry broke,
another round registering while this one trains. Registration itself is real."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from tests.training.data_gen import synthetic_table, watermark_of
from training import round_finish as round_mod
from training.config import GateConfig, ModelConfig
from training.data import Examples
from training.errors import (
    ConcurrentRoundError,
    EmptyRoundError,
    LineageError,
    NonFiniteWeightsError,
    RoundTooSmallError,
)
from training.model import Recommender, save_weights
from training.registry import Registry
from training.round import RoundConfig, run_round
from training.vocab import ItemVocab

CFG = RoundConfig(
    model=ModelConfig(max_len=10, d_model=16, text_init=False),
    gate=GateConfig(min_eval_users=5),
)


def _as_trained(patch: pytest.MonkeyPatch, make: Any) -> None:
    def train(
        init: Recommender, teacher: Any, ex: Examples, cfg: RoundConfig, cold: bool,
        run_id: str | None = None,
    ) -> Any:  # fmt: skip
        return make(init), {"loss": 1.0}

    patch.setattr(round_mod, "train", train)


def _nan(init: Recommender) -> Recommender:
    with torch.no_grad():
        for p in init.parameters():
            p.fill_(float("nan"))
    return init


def test_non_finite_candidate_is_refused_and_nothing_recorded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reg = Registry(tmp_path / "reg")
    _as_trained(monkeypatch, _nan)
    table = synthetic_table(600, seed=1)
    with pytest.raises(NonFiniteWeightsError, match="non-finite weights"):
        run_round(table, table.slice(0, 0), watermark_of(table), reg, CFG)
    assert reg.versions() == [] and reg.decisions() == [] and reg.champion() is None


def test_another_round_registering_meanwhile_is_a_conflict(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reg = Registry(tmp_path / "reg")
    table = synthetic_table(600, seed=1)

    def sneak_in(init: Recommender) -> Recommender:
        # Another process registers while this round trains.
        vocab = ItemVocab(table.column("item_id").to_pylist())

        def write(d: Path) -> None:
            save_weights(Recommender(CFG.model, len(vocab)), d / "model.safetensors")
            vocab.save(d / "vocab.json")

        reg.register(write, {"model_config": CFG.model.model_dump(), "watermark": {}},
                     promote=True, reason="the other round", expect_latest=None)  # fmt: skip
        return init

    _as_trained(monkeypatch, sneak_in)
    with pytest.raises(ConcurrentRoundError):
        run_round(table, table.slice(0, 0), watermark_of(table), reg, CFG)
    assert reg.versions() == [1] and [d["version"] for d in reg.decisions()] == [1]


def test_broken_item_lineage_is_an_error_not_an_assert(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reg = Registry(tmp_path / "reg")

    def put(items: list[str], promote: bool) -> None:
        vocab = ItemVocab(items)

        def write(d: Path) -> None:
            save_weights(Recommender(CFG.model, len(vocab)), d / "model.safetensors")
            vocab.save(d / "vocab.json")

        reg.register(write, {"model_config": CFG.model.model_dump(), "watermark": {}},
                     promote=promote, reason="setup")  # fmt: skip

    put(["a", "b", "c"], promote=True)
    put(["b", "a", "c", "d"], promote=False)  # rows of a and b swapped: the lineage broke
    _as_trained(monkeypatch, lambda m: m)
    table = synthetic_table(600, seed=1)
    with pytest.raises(LineageError, match="does not extend"):
        run_round(table, table.slice(0, 0), watermark_of(table), reg, CFG)
    assert reg.versions() == [1, 2]


def test_a_round_without_examples_is_refused_before_training(tmp_path: Path) -> None:
    reg = Registry(tmp_path / "reg")
    table = synthetic_table(600, seed=1)
    users = table.column("user_id").to_pylist()
    first_of_each = table.take([users.index(u) for u in sorted(set(users))])
    with pytest.raises(EmptyRoundError, match="no training example"):
        run_round(first_of_each, table.slice(0, 0), watermark_of(table), reg, CFG)
    assert reg.versions() == []


def test_a_round_too_small_to_gate_waits_instead_of_being_rejected(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reg = Registry(tmp_path / "reg")
    trained: list[int] = []
    _as_trained(monkeypatch, lambda init: trained.append(1) or init)
    table = synthetic_table(600, seed=1)
    strict = CFG.model_copy(update={"gate": GateConfig(min_eval_users=10**6)})
    with pytest.raises(RoundTooSmallError, match="too few to gate"):
        run_round(table, table.slice(0, 0), watermark_of(table), reg, strict)
    # Nothing trained, registered or decided: the events stay for the next, larger round.
    assert trained == [] and reg.versions() == [] and reg.decisions() == []
    r = run_round(table, table.slice(0, 0), watermark_of(table), reg, CFG)
    assert r.version == 1 and trained == [1]
