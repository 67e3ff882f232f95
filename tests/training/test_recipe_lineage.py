"""The recipe in the product (training.recipe): searched for a lineage's first version with
``tune.first_version``, recorded in every version's meta, inherited by the later rounds."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from tests.training.data_gen import synthetic_table, watermark_of
from training.carry import Carry
from training.config import GateConfig, ModelConfig, ReplayConfig, TrainerConfig, TuneConfig
from training.data import round_examples
from training.histories import UserHistories
from training.recipe import (
    RECIPE_KEY,
    RecipeError,
    RecipeRecord,
    choose,
    fixed,
    inherited,
    search_data,
    searched,
)
from training.round_config import RoundConfig
from training.round_steps import RoundExamples
from training.tune_result import SearchResult, TrialRow
from training.vocab import ItemVocab

MAX_LEN = 20


def fake_search(tmp: Path, best_epoch: int = 3) -> SearchResult:
    """What ``training.tune.search`` returns for a winner of width 64, 2 blocks, lr 2e-3, global
    batch 64 (its trainer reseeded, as the search reseeds it)."""
    best = TrialRow("t1", {"d_model": 64, "lr": 2e-3}, 0.21, best_epoch, 5, 1.0, 2.0)
    model = ModelConfig(max_len=MAX_LEN, d_model=64, n_layers=2, n_heads=4, dropout=0.3)
    trainer = TrainerConfig(lr=2e-3, batch_size=64, seed=99)
    return SearchResult(best, model, trainer, [best], 60.0, 4.0, tmp, unstarted=1)


def test_the_winning_recipe_is_applied_to_the_first_round(tmp_path: Path) -> None:
    cfg = RoundConfig(model=ModelConfig(max_len=MAX_LEN), trainer=TrainerConfig(num_workers=2))
    out, record = searched(cfg, fake_search(tmp_path), str(tmp_path / "search.json"))
    m, t = out.model, out.trainer
    assert (m.d_model, m.n_layers, m.n_heads, m.dropout, m.max_len) == (64, 2, 4, 0.3, MAX_LEN)
    # The search's global batch of 64 is 32 per worker; epochs where validation peaked.
    assert (t.lr, t.batch_size, t.first_round_epochs) == (2e-3, 32, 3)
    assert t.seed == cfg.trainer.seed  # not the search's seed
    assert record.source == "searched" and record.origin == "searched"
    assert record.trainer.global_batch_size == 64 and record.model.d_model == 64
    assert record.search is not None and record.search.table.endswith("search.json")
    assert record.search.best_valid_ndcg10 == 0.21 and record.search.unstarted == 1


def test_a_later_round_inherits_lr_and_batch_and_says_from_where(tmp_path: Path) -> None:
    first = RoundConfig(trainer=TrainerConfig(num_workers=2))
    out, rec1 = searched(first, fake_search(tmp_path), "search.json")
    later = RoundConfig(trainer=TrainerConfig(num_workers=4))  # nothing set by the user
    cfg2, rec2 = inherited(later, out.model, 1, {RECIPE_KEY: rec1.model_dump(mode="json")})
    assert cfg2.trainer.lr == 2e-3
    assert cfg2.trainer.batch_size == 16  # the global 64 over 4 workers now
    assert cfg2.model == later.model  # the architecture comes with the champion, not from here
    assert rec2.source == "inherited from v1" and rec2.origin == "searched"
    assert rec2.origin_version == 1 and rec2.explicit == []
    assert rec2.model.d_model == 64 and rec2.search == rec1.search
    # Carried forward: v3 inherits v2's, which began with v1's search.
    _, rec3 = inherited(later, out.model, 2, {RECIPE_KEY: rec2.model_dump(mode="json")})
    assert rec3.source == "inherited from v2" and rec3.origin_version == 1
    assert rec3.trainer.lr == 2e-3


def test_the_users_explicit_settings_win_over_the_inherited_ones(tmp_path: Path) -> None:
    from services.settings import load_settings

    _, rec1 = searched(RoundConfig(), fake_search(tmp_path), "search.json")
    meta = {RECIPE_KEY: rec1.model_dump(mode="json")}
    path = tmp_path / "settings.yaml"
    path.write_text("trainer:\n  lr: 0.001\n")
    s = load_settings(path)
    cfg = RoundConfig(model=s.model, trainer=s.trainer, tune=s.tune)
    out, rec = inherited(cfg, ModelConfig(), 1, meta)
    assert out.trainer.lr == 1e-3 and rec.trainer.lr == 1e-3  # set in the file: kept
    assert out.trainer.batch_size == 32 and rec.explicit == ["lr"]  # not set: inherited


def test_a_version_without_search_records_the_fixed_recipe() -> None:
    cfg = RoundConfig(trainer=TrainerConfig(num_workers=2, batch_size=16, lr=5e-3))
    rec = fixed(cfg, cfg.model)
    assert rec.source == "fixed" and rec.search is None and rec.origin_version is None
    assert (rec.trainer.lr, rec.trainer.global_batch_size) == (5e-3, 32)
    assert rec.trainer.first_round_epochs == cfg.trainer.first_round_epochs
    # choose: a first round with the search off trains and records the configured recipe.
    no_examples: Any = None  # only a search reads them
    plan: Any = SimpleNamespace(state=SimpleNamespace(champion=None), champ_v=None,
                                mcfg=cfg.model)  # fmt: skip
    chosen = choose(plan, no_examples, cfg)
    assert chosen.cfg is cfg and chosen.record == rec and chosen.search_s == 0.0
    # A champion from before versions recorded a recipe: the configured one, said so.
    old = SimpleNamespace(meta={"model_config": {}})
    plan = SimpleNamespace(state=SimpleNamespace(champion=old), champ_v=4, mcfg=cfg.model)
    chosen = choose(plan, no_examples, cfg)
    assert chosen.cfg is cfg and chosen.record.source == "fixed"
    assert chosen.record.note is not None and "v4" in chosen.record.note
    with pytest.raises(RecipeError):
        inherited(cfg, cfg.model, 4, {RECIPE_KEY: {"source": "guessed"}})
    with pytest.raises(ValueError):
        RecipeRecord.model_validate({**rec.model_dump(), "source": "inherited from v"})


def test_the_search_sees_the_rounds_training_events_only() -> None:
    # Every (user, position) its own item: what the search sees can be traced to its events.
    new = {f"u{u}": list(range(1 + 10 * u, 1 + 10 * u + 2 + u % 5)) for u in range(30)}
    vocab = ItemVocab(f"i{r}" for r in range(1, 400))
    new_ex, new_hold = round_examples({}, new, MAX_LEN, 3)
    ex = RoundExamples(new, new_ex, new_hold, Carry.empty(MAX_LEN))
    data = search_data(ex, UserHistories(MAX_LEN), vocab, {}, MAX_LEN)
    gate_items = set(new_hold.targets.tolist())
    seen_items = set(data.examples.inputs.ravel().tolist()) | set(
        data.examples.targets.ravel().tolist()
    )
    seen_items |= set(data.valid_targets.tolist())
    seen_items |= {int(x) for h in data.valid_histories for x in h}
    assert gate_items and not gate_items & seen_items  # the gate's questions never reach it
    # Validation: each user's last training event, given the events before it; not trained on.
    n_hold = np.bincount(new_hold.users, minlength=len(new))
    lasts = [rows[len(rows) - n_hold[k] - 1] for k, rows in enumerate(new.values())
             if len(rows) - n_hold[k] >= 2]  # fmt: skip
    assert sorted(data.valid_targets.tolist()) == sorted(lasts)
    assert not set(lasts) & set(data.examples.targets.ravel().tolist())
    assert data.events == int((data.examples.targets != 0).sum()) > 0


def test_the_loop_frees_a_running_session_before_a_search() -> None:
    from services.loop import ContinualLoop
    from training.session import TrainingSession

    closed: list[bool] = []
    running = SimpleNamespace(running=True, close=lambda: closed.append(True))
    loop: Any = ContinualLoop.__new__(ContinualLoop)
    loop.session = running
    loop._free_session()
    assert closed == [True]
    assert isinstance(loop.session, TrainingSession) and not loop.session.running
    idle = loop.session
    loop._free_session()  # not started: nothing to free, and kept
    assert loop.session is idle


# -- with real Ray: a searched first version, an inheriting second ---------------------------


@pytest.fixture
def two_cpu_ray() -> Iterator[None]:
    import ray

    # Two CPUs, as on a 2-core machine: the session's two workers would hold all of them, so the
    # search completes only because it runs before the session starts.
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.mark.integration
@pytest.mark.slow
def test_a_searched_first_version_and_an_inheriting_second(
    tmp_path: Path, two_cpu_ray: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    from training import round_finish
    from training.gate import GateResult
    from training.registry import Registry
    from training.round import run_round
    from training.session import TrainingSession

    # Quality is not asserted here: every round is promoted, so the second one warm-starts.
    monkeypatch.setattr(round_finish, "gate", lambda *a, **k: GateResult(True, "test", {}))
    cfg = RoundConfig(
        model=ModelConfig(max_len=MAX_LEN, text_init=False),
        trainer=TrainerConfig(
            num_workers=2, epochs=1, storage_path=tmp_path / "ray", max_failures=0
        ),
        replay=ReplayConfig(capacity=1000),
        gate=GateConfig(min_eval_users=10),
        tune=TuneConfig(
            first_version=True,
            budget_cpu_minutes=0.3,
            max_trials=2,
            max_epochs=2,
            grace_epochs=1,
            patience=2,
            storage_path=tmp_path / "tune",
        ),
    )
    reg = Registry(tmp_path / "registry")
    session = TrainingSession()  # the loop's default: workers kept up, started by a round
    t0 = time.monotonic()
    try:
        first = synthetic_table(2000, seed=3)
        r1 = run_round(first, first.slice(0, 0), watermark_of(first), reg, cfg,
                       trainer=session.train)  # fmt: skip
        second = synthetic_table(1000, seed=3, start=2000)
        r2 = run_round(second, first, watermark_of(second), reg, cfg, trainer=session.train)
    finally:
        session.close()
    elapsed = time.monotonic() - t0
    assert (r1.version, r1.kind, r2.version, r2.kind) == (1, "first", 2, "incremental")
    assert r1.phases["search"] > 0 and "search" not in r2.phases
    meta1, meta2 = reg.meta(1), reg.meta(2)
    rec1 = RecipeRecord.model_validate(meta1[RECIPE_KEY])
    assert rec1.source == "searched", rec1.note
    assert rec1.search is not None and 1 <= rec1.search.trials <= 2
    assert Path(rec1.search.table).is_file()
    # v1 was trained in the winning architecture with its lr and batch.
    assert meta1["model_config"]["d_model"] == rec1.model.d_model
    assert meta1["trainer_config"]["lr"] == rec1.trainer.lr
    assert meta1["trainer_config"]["batch_size"] == rec1.trainer.batch_size
    rec2 = RecipeRecord.model_validate(meta2[RECIPE_KEY])
    assert rec2.source == "inherited from v1" and rec2.origin == "searched"
    assert (rec2.trainer.lr, rec2.trainer.batch_size) == (rec1.trainer.lr, rec1.trainer.batch_size)
    assert meta2["trainer_config"]["lr"] == rec1.trainer.lr
    assert meta2["model_config"]["d_model"] == rec1.model.d_model  # warm-started from v1
    assert elapsed < 120, (elapsed, r1.phases, r2.phases)
