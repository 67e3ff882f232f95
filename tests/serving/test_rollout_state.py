"""Rollout state without Serve: what survives a restart, and the same-window click-through."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from serving.config import RolloutConfig, ServingConfig
from serving.context import (
    BUCKET_KEEP_S,
    SNAPSHOT_RECENT,
    VersionStats,
    chosen_versions,
    forget_versions,
)
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


def _stats_of(n: int, now: float) -> dict[str, VersionStats]:
    """``n`` versions, one a second, each last active when it was served."""
    stats = {}
    for v in range(1, n + 1):
        st = stats[str(v)] = VersionStats()
        st.last_active = 0.0
        st.add_served(10, at=now - (n - v))
    return stats


def test_a_snapshot_carries_a_bounded_set_of_versions_however_many_were_served() -> None:
    now = 2_000_000.0
    stats = _stats_of(5_000, now)  # a round every second for well over an hour
    live = {"4990", "12"}  # one replica still on an old version
    default = chosen_versions(stats, live, None)
    newest = {str(v) for v in range(5_000 - SNAPSHOT_RECENT + 1, 5_001)}
    assert set(default) == live | newest
    assert chosen_versions(stats, live, ["7", "nope"]) == ["7"]
    assert chosen_versions(stats, live, []) == []


def test_stats_of_versions_long_gone_are_forgotten_but_not_the_live_ones() -> None:
    now = 2_000_000.0
    stats = _stats_of(3, now)
    stats["1"].last_active = stats["2"].last_active = now - BUCKET_KEEP_S - 1
    forget_versions(stats, {"2"}, now)
    assert set(stats) == {"2", "3"}  # 1: idle past the bucket horizon and not served by anyone


def test_close_waits_for_a_background_deploy(tmp_path: Path) -> None:
    """Shutting down waits for a first deploy still running beside the controller (a Ray call
    from it after ``ray.shutdown`` would start a stray Ray session in the process)."""
    import threading

    ctl = _controller(Registry(tmp_path / "reg"))
    assert ctl.close(0.0)  # nothing deploying
    release = threading.Event()
    ctl._deploying = threading.Thread(target=release.wait, args=(10.0,), name="serve-deploy")
    ctl._deploying.start()
    assert not ctl.close(0.05)  # still deploying: not closed
    release.set()
    assert ctl.close(5.0) and not ctl._deploying.is_alive()
