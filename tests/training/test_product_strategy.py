"""bench.product_stream without Ray: the product's real rounds (run_round, gate, registry, carry)
with the training step handed in, so each test chooses which rounds train a broken candidate."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import numpy as np
import torch

from harness.prequential import StreamConfig, build_chunks, run_stream
from harness.product_stream import KEY, ProductStrategy, ProductStream, product_table, round_slices
from harness.strategies import train_fit
from tests.training.data_gen import synthetic_table
from training.config import GateConfig, ModelConfig
from training.data import Examples
from training.evaluation import Interactions, ModelScorer, encode
from training.model import Recommender
from training.registry import Registry
from training.round import RoundConfig

CFG = RoundConfig(
    model=ModelConfig(max_len=10, d_model=16, text_init=False),
    gate=GateConfig(min_eval_users=5),
)


class Trainer:
    """Cold: a few real epochs in process. Warm: the champion unchanged, or, for the warm calls
    numbered in ``broken``, an all-zero model (constant scores: the gate must reject it)."""

    def __init__(self, broken: set[int]) -> None:
        self.broken, self.warm_calls = broken, 0

    def __call__(self, init: Recommender, teacher: Recommender | None, examples: Examples,
                 cfg: RoundConfig, cold: bool = False, run_id: str | None = None,
                 ) -> tuple[Recommender, dict[str, float]]:  # fmt: skip
        model = Recommender.from_state(init.cfg, init.state_dict())
        if cold:
            train_fit(model, examples, StreamConfig(), 4, seed=0)
        else:
            self.warm_calls += 1
            if self.warm_calls in self.broken:
                model = Recommender.from_state(
                    init.cfg, {k: torch.zeros_like(v) for k, v in init.state_dict().items()}
                )
        model.eval()
        return model, {"loss": 1.0}


def _strategy(tmp_path: Path, inter: Interactions, trainer: Trainer, round_events: int
              ) -> ProductStrategy:  # fmt: skip
    return ProductStrategy(inter, ProductStream(round_events=round_events),
                           Registry(tmp_path / "registry"), CFG, trainer)  # fmt: skip


def _inter() -> Interactions:
    return encode(synthetic_table(2400, users=60))


def test_table_and_slices() -> None:
    inter = _inter()
    t = product_table(inter)
    assert set(t.column("topic").to_pylist()) == {"events"}
    assert t.column("offset").to_pylist() == list(range(t.num_rows))
    parts = round_slices(np.arange(1000), 300)
    assert [len(p) for p in parts] == [250, 250, 250, 250]
    assert np.array_equal(np.concatenate(parts), np.arange(1000))


def test_rejected_round_is_carried_and_counted(tmp_path: Path) -> None:
    inter = _inter()
    chunks = build_chunks(inter, 3, 200, 0)
    strategy = _strategy(tmp_path, inter, Trainer(broken={2}), round_events=200)
    strategy.start(chunks[0])
    assert strategy.registry.champion() == 1
    [res] = run_stream(chunks, [strategy])
    report = strategy.report()
    c1 = strategy.counts[1]
    assert (c1.rounds, c1.promoted, c1.rejected) == (4, 3, 1)
    rejected = strategy.registry.meta(3)
    assert rejected["decision"] == "reject"
    # The next round trained the rejected round's events again, and was promoted.
    nxt = strategy.registry.meta(4)
    assert nxt["decision"] == "promote" and nxt["carried_events"] == rejected["new_events"] > 0
    assert c1.carried_events == rejected["new_events"]
    assert report["rejected"] == 1 and report["never_trained"] == 0
    assert len(res.stream_ndcg10) == 2 and all(x > 0 for x in res.stream_ndcg10)
    champ = strategy.registry.champion()
    scorer = strategy.scorer()
    assert isinstance(scorer, ModelScorer) and champ == strategy.registry.latest()


def test_refused_rounds_leave_their_events_pending(tmp_path: Path) -> None:
    inter = _inter()
    chunks = build_chunks(inter, 3, 200, 0)
    strategy = _strategy(tmp_path, inter, Trainer(broken=set()), round_events=1)
    strategy.start(chunks[0])
    first_wm = strategy.registry.meta(1)["watermark"][KEY]
    strategy.update(chunks[1].train_rows[:12], chunks[1].train_rows[:12])
    counts = strategy.counts[1]
    assert counts.refused > 0 and counts.rounds > 0
    metas: list[dict[str, Any]] = [strategy.registry.meta(v) for v in range(2, 2 + counts.rounds)]
    # A round after refusals covers every event that waited: its slice starts where the
    # previous version's ended, and the slices together cover the delivered rows exactly.
    assert metas[0]["after_watermark"] == {KEY: first_wm}
    for prev, cur in itertools.pairwise(metas):
        assert cur["after_watermark"] == prev["watermark"]
    assert sum(m["new_events"] for m in metas) + len(strategy.pending) == 12
    assert max(m["new_events"] for m in metas) > 1
