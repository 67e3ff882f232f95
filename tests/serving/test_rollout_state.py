"""Rollout state without Serve: what survives a restart, and the same-window click-through."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from serving.config import RolloutConfig, ServingConfig
from serving.context import VersionStats
from serving.rollout import RolloutController
from training.registry import Registry, RolloutState


def _write(d: Path) -> None:
    save_file({"w": np.ones((4, 3), np.float32)}, str(d / "model.safetensors"))


def _controller(reg: Registry) -> RolloutController:
    return RolloutController(reg, ServingConfig(), RolloutConfig(), context=None)


def test_controller_state_comes_from_the_registry(tmp_path: Path) -> None:
    reg = Registry(tmp_path / "reg")
    v1 = reg.register(_write, {}, promote=True, reason="a", expect_latest=None)
    v2 = reg.register(_write, {}, promote=True, reason="b", expect_latest=v1)
    reg.set_rollout_state(RolloutState(serving=v2, previous=v1, watch_since=1234.5))
    ctl = _controller(reg)
    assert (ctl.current, ctl.previous, ctl.watch_since) == (v2, v1, 1234.5)
    assert not ctl.deployed  # a new process must re-point Serve before judging anything


def test_rollback_impossible_is_recorded_once_across_polls_and_restarts(tmp_path: Path) -> None:
    reg = Registry(tmp_path / "reg")
    v1 = reg.register(_write, {}, promote=True, reason="first ever", expect_latest=None)
    # The state a first rollout leaves: serving v1, nothing to roll back to, being watched.
    reg.set_rollout_state(RolloutState(serving=v1, previous=None, watch_since=time.time()))
    ctl = _controller(reg)
    for _ in range(5):
        assert ctl.rollback("error rate 40% > 5%") is None
    again = _controller(reg)  # restarted: it must not say it again
    assert again.rollback_impossible == v1 and again.watch_since is None
    again.rollback("error rate 40% > 5%")
    lines = [d for d in reg.decisions() if d["decision"] == "rollback-impossible"]
    assert len(lines) == 1 and lines[0]["version"] == v1
    assert reg.champion() == v1


def test_click_windows_compare_the_same_stretch_of_time() -> None:
    old, new = VersionStats(), VersionStats()
    t0 = 1_000_000.0
    # The old version served for an hour with a 10% click-through, then 20% in its last minute.
    for s in range(3600):
        old.add_served(10, at=t0 - 3600 + s)
        old.add_click(served_at=t0 - 3600 + s)
    for s in range(60):
        old.add_click(served_at=t0 - 60 + s)
    for s in range(60):
        new.add_served(10, at=t0 + s)
        new.add_click(served_at=t0 + s)
    now = t0 + 60
    span = now - t0
    recent_old = old.window(t0 - span, now)
    assert recent_old["served"] == 600 and recent_old["clicked"] == 120
    assert new.window(t0, now)["ctr"] == 0.1
    # Lifetime counts would call the new version as good as the old one (10.2% vs 10%);
    # the same window shows it at half of the old version's recent click-through.
    assert abs(old.summary()["ctr"] - new.summary()["ctr"]) < 0.01
    assert new.window(t0, now)["ctr"] == 0.5 * recent_old["ctr"]
    old.forget_before(t0 - 30)
    assert old.window(t0 - 3600, now)["served"] == 300
