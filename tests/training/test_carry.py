"""A rejected round's events are trained on again by the next round, not lost to learning.

No Ray: training is replaced from outside (it returns its init and records what it was given) and
the gate's verdict is chosen per round, so the test controls which rounds are rejected.
Registration, the carry's files and the round's accounting are real.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest

from services.freshness import Ledger
from tests.training.data_gen import synthetic_table
from training import round_finish as round_mod
from training.carry import Carry
from training.config import GateConfig, ModelConfig, ReplayConfig
from training.data import Examples
from training.gate import GateResult
from training.model import Recommender
from training.registry import Registry
from training.round import RoundConfig, run_round

CFG = RoundConfig(
    model=ModelConfig(max_len=10, d_model=16, text_init=False),
    gate=GateConfig(min_eval_users=5),
    replay=ReplayConfig(ratio=0.0),  # what a round trains on: its own examples and the carry
)


class Rounds:
    """Runs rounds over consecutive slices of one table, with the gate's verdict given."""

    def __init__(self, tmp: Path, patch: pytest.MonkeyPatch, cfg: RoundConfig = CFG) -> None:
        self.reg, self.cfg = Registry(tmp / "reg"), cfg
        self.table = synthetic_table(2400, seed=3)
        self.at = 0
        self.verdict = True
        self.seen: list[Examples] = []

        def train(init: Recommender, teacher: Any, ex: Examples, cfg: Any, cold: bool,
                  run_id: str | None = None) -> Any:  # fmt: skip
            self.seen.append(ex)
            return init, {"loss": 1.0}

        def gate(*args: Any, **kwargs: Any) -> GateResult:
            return GateResult(self.verdict, "chosen by the test")

        patch.setattr(round_mod, "train", train)
        patch.setattr(round_mod, "gate", gate)

    def run(self, n: int, promote: bool) -> Any:
        self.verdict = promote
        new = self.table.slice(self.at, n)
        after = {"events:0": self.at} if self.at else {}
        self.at += n
        fresh = self.reg.champion() is None
        context = new.slice(0, 0) if fresh else None
        return run_round(new, context, {"events:0": self.at}, self.reg, self.cfg,
                         {"after_watermark": after})  # fmt: skip


def _rows(ex: Examples) -> set[bytes]:
    return {np.concatenate([i, t]).tobytes() for i, t in zip(ex.inputs, ex.targets, strict=True)}


def test_a_rejected_rounds_examples_are_trained_by_the_next_round(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    r = Rounds(tmp_path, monkeypatch)
    assert r.run(1200, promote=True).version == 1
    rejected = r.run(400, promote=False)
    assert not rejected.promoted and rejected.trained == []
    own_2 = r.seen[-1]
    assert Carry.exists(r.reg.path(2)) and r.reg.meta(2)["carry_events"] == 400
    third = r.run(400, promote=True)
    # The promoted round trained on round 2's examples again, beside its own.
    assert _rows(own_2) <= _rows(r.seen[-1])
    assert len(r.seen[-1]) > len(own_2)
    assert third.carried_events == 400
    assert [s["upto"] for s in third.trained] == [{"events:0": 1600}, {"events:0": 2000}]
    assert not Carry.exists(r.reg.path(3))  # emptied by the promotion
    # The accounting: round 2's events count as first trained by v3, none never trained.
    ledger = Ledger([{"version": x.version, "promoted": x.promoted, "trained": x.trained,
                      "dropped": x.dropped} for x in (rejected, third)])  # fmt: skip
    assert ledger.first_trained_by("events:0", 1300) == 3
    assert ledger.first_trained_by("events:0", 1900) == 3
    assert ledger.never_trained_events() == 0


def test_two_rejections_in_a_row_carry_both_and_the_cap_lets_the_oldest_go(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    r = Rounds(tmp_path, monkeypatch)
    r.run(1200, promote=True)
    r.run(300, promote=False)
    first_carry = len(r.seen[-1])
    # A cap that holds one rejected round's examples but not two: the older one goes.
    r.cfg = CFG.model_copy(
        update={"replay": ReplayConfig(ratio=0.0, carry_max_examples=first_carry + 1)}
    )
    third = r.run(300, promote=False)
    assert [s["upto"] for s in third.dropped] == [{"events:0": 1500}]
    assert r.reg.meta(3)["carry_events"] == 300
    fourth = r.run(300, promote=True)
    assert [s["upto"] for s in fourth.trained] == [{"events:0": 1800}, {"events:0": 2100}]
    ledger = Ledger([{"version": x.version, "promoted": x.promoted, "trained": x.trained,
                      "dropped": x.dropped} for x in (third, fourth)])  # fmt: skip
    assert ledger.never_trained_events() == 300
    assert ledger.first_trained_by("events:0", 1250) is None and ledger.dropped("events:0", 1250)


def test_a_fresh_start_ignores_the_carry_since_it_reads_everything(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    r = Rounds(tmp_path, monkeypatch)
    first = r.run(1200, promote=False)  # no champion: the next round starts over on everything
    assert first.trained == [] and r.reg.champion() is None
    table: pa.Table = r.table.slice(0, 1600)
    r.verdict = True
    again = run_round(table, table.slice(0, 0), {"events:0": 1600}, r.reg, CFG,
                      {"after_watermark": {}})  # fmt: skip
    assert again.carried_events == 0 and again.trained[0]["after"] == {}


def test_a_round_without_new_events_trains_the_carry_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The end of a quiet stream: the last round was rejected and nothing new comes. The loop's
    carry round has no events of its own; it trains the carried ones (with replay) and is gated
    on earlier rounds' questions."""
    r = Rounds(tmp_path, monkeypatch, CFG.model_copy(update={"replay": ReplayConfig(ratio=1.0)}))
    r.run(1200, promote=True)
    r.run(400, promote=False)
    carried = Carry.load(r.reg.path(2)).examples
    tail = r.run(0, promote=True)
    assert tail.new_events == 0 and tail.carried_events == 400
    assert _rows(carried) <= _rows(r.seen[-1]) and len(r.seen[-1]) > len(carried)  # + replay
    assert [s["upto"] for s in tail.trained] == [{"events:0": 1600}, {"events:0": 1600}]
    assert r.reg.meta(tail.version)["watermark"] == {"events:0": 1600}


def test_a_rolled_back_versions_events_are_carried_by_the_next_round(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Serving rolls the champion back past two promoted versions (a live trial's guard, say):
    their events are in no live version's weights now. The next round, from the older champion,
    trains them again with its own; a round after that does not add them twice."""
    r = Rounds(tmp_path, monkeypatch)
    r.run(1200, promote=True)  # v1: the baseline
    r.run(300, promote=True)  # v2
    own_2 = r.seen[-1]
    r.run(300, promote=False)  # v3, rejected: carried by v4
    r.run(300, promote=True)  # v4 trained v3's and its own
    trained_4 = r.seen[-1]
    r.reg.mark_rolled_back(4, "the baseline won the live trial", to=1)
    assert r.reg.champion() == 1
    fifth = r.run(200, promote=False)  # v5 from v1: carries v2's, v3's, v4's events and its own
    seen_5 = r.seen[-1]
    assert _rows(own_2) <= _rows(seen_5) and _rows(trained_4) <= _rows(seen_5)
    assert fifth.carried_events == 900
    sixth = r.run(200, promote=True)  # v6: the carry once, not the rolled-back versions again
    assert sixth.carried_events == 1100  # 2,000 if the rolled-back versions came in again
    assert _rows(seen_5) <= _rows(r.seen[-1])
    uptos = [s["upto"]["events:0"] for s in sixth.trained]
    assert uptos == sorted(set(uptos)) == [1500, 1800, 2100, 2300, 2500], uptos
