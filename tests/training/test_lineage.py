"""The state a round keeps for the next one is the state the next one would read from storage.

No Ray (training replaced from outside, as in test_carry); registration and files are real.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.training.test_carry import CFG, Rounds
from training import lineage
from training.config import ReplayConfig
from training.lineage import Lineage
from training.round_config import RoundConfig
from training.round_steps import lineage_settings

# Replay on, so the reservoir (and its random state) moves with every round.
REPLAY = CFG.model_copy(update={"replay": ReplayConfig(ratio=1.0, capacity=300)})


def _read(r: Rounds, cfg: RoundConfig) -> Lineage:
    return lineage.read(
        r.reg, r.reg.latest(), r.reg.champion(), cfg.model, cfg.replay.capacity,
        cfg.gate.replay_eval_size, cfg.gate.recent_questions, cfg.replay.seed,
    )  # fmt: skip


def _same(kept: Lineage, read: Lineage) -> None:
    assert kept.base == read.base
    assert kept.vocab.items() == read.vocab.items() and kept.titles == read.titles
    assert kept.popularity == read.popularity
    for a, b in ((kept.reservoir, read.reservoir), (kept.probes, read.probes)):
        assert np.array_equal(a.inputs, b.inputs) and np.array_equal(a.targets, b.targets)
        assert a.seen == b.seen and a.rng.bit_generator.state == b.rng.bit_generator.state
    assert np.array_equal(kept.recent.histories, read.recent.histories)
    assert kept.carry.events == read.carry.events and len(kept.carry) == len(read.carry)
    assert (kept.champion is None) == (read.champion is None)
    if kept.champion is not None and read.champion is not None:
        assert kept.champion.version == read.champion.version
        assert kept.champion.vocab.items() == read.champion.vocab.items()
        ks, rs = kept.champion.model.state_dict(), read.champion.model.state_dict()
        assert ks.keys() == rs.keys() and all(np.array_equal(ks[k], rs[k]) for k in ks)


def test_kept_state_equals_what_storage_holds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    r = Rounds(tmp_path, monkeypatch, REPLAY)
    settings = lineage_settings(REPLAY)
    reads: list[int | None] = []
    read = lineage.read
    monkeypatch.setattr(
        lineage, "read", lambda reg, base, *a: reads.append(base) or read(reg, base, *a)
    )
    for n, promote in [(1200, True), (300, False), (300, True), (300, True)]:
        v = r.run(n, promote=promote).version
        kept = lineage.take(r.reg, v, r.reg.champion(), settings)
        assert kept is not None, f"round v{v} kept nothing"
        _same(kept, _read(r, REPLAY))
        lineage.keep(r.reg, kept, settings)  # the next round takes it as the loop's would
    # The first round read (there was nothing yet); the others took the kept state: every other
    # read is this test's own, one per version.
    assert reads == [None, 1, 2, 3, 4]


def test_kept_state_is_used_only_where_it_belongs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    r = Rounds(tmp_path, monkeypatch, REPLAY)
    settings = lineage_settings(REPLAY)
    v = r.run(1200, promote=True).version
    assert lineage.take(r.reg, v, v, lineage_settings(CFG)) is None  # other settings
    r.run(300, promote=True)
    assert lineage.take(r.reg, v, v, settings) is None  # an older version than the latest
    # A round that finds nothing kept (another process registered, a restart) reads storage.
    v3 = r.run(300, promote=False).version
    assert lineage.take(r.reg, v3, r.reg.champion(), settings) is not None
    assert lineage.take(r.reg, v3, r.reg.champion(), settings) is None  # taken once
    _same(_read(r, REPLAY), _read(r, REPLAY))
    assert r.run(300, promote=True).version == v3 + 1
