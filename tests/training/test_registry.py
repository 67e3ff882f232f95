"""The registry's write discipline: one writer per fact, CAS on the champion, repair, refusals."""

from __future__ import annotations

import json
import multiprocessing as mp
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors.numpy import save_file

from training.errors import ConcurrentRoundError, NonFiniteWeightsError
from training.registry import Registry, RegistryIntegrityError, RolloutState


def _writer(value: float = 1.0) -> Any:
    def write(d: Path) -> None:
        save_file(
            {"w": np.full((4, 3), value, np.float32), "ids": np.arange(3)},
            str(d / "model.safetensors"),
        )
        (d / "vocab.json").write_text("[]")

    return write


def _reg(tmp_path: Path, keep: int = 10) -> Registry:
    return Registry(tmp_path / "reg", keep=keep)


def test_register_records_its_decision_and_moves_the_champion(tmp_path: Path) -> None:
    reg = _reg(tmp_path)
    v1 = reg.register(_writer(), {"watermark": {"t:0": 5}}, promote=True, reason="first",
                      expect_latest=None)  # fmt: skip
    v2 = reg.register(_writer(), {"parent": v1}, promote=False, reason="worse", expect_latest=v1)
    assert (v1, v2) == (1, 2)
    assert reg.champion() == v1 and reg.champion_state().generation == 1
    assert [(d["version"], d["decision"]) for d in reg.decisions()] == [
        (1, "promote"),
        (2, "reject"),
    ]
    meta = reg.version_meta(v2)
    assert meta.decision == "reject" and meta.reason == "worse" and meta.parent == v1
    assert meta.base_generation == 1
    assert reg.meta(v1)["watermark"] == {"t:0": 5}  # dict access keeps working for callers
    assert reg.meta(v2).get("parent") == v1


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_weights_are_refused_and_nothing_becomes_visible(
    tmp_path: Path, bad: float
) -> None:
    reg = _reg(tmp_path)
    v1 = reg.register(_writer(), {}, promote=True, reason="ok", expect_latest=None)

    def write(d: Path) -> None:
        w = np.random.default_rng(0).normal(size=(5, 3)).astype(np.float32)
        w[2, 1] = bad
        save_file({"w": w}, str(d / "model.safetensors"))

    with pytest.raises(NonFiniteWeightsError, match="NaN/inf"):
        reg.register(write, {}, promote=True, reason="looks great", expect_latest=v1)
    assert reg.versions() == [v1] and reg.champion() == v1
    assert len(reg.decisions()) == 1
    assert [p.name for p in reg.root.iterdir() if p.name.startswith(".tmp")] == []


def test_stale_expect_latest_is_refused(tmp_path: Path) -> None:
    reg = _reg(tmp_path)
    v1 = reg.register(_writer(), {}, promote=True, reason="a", expect_latest=None)
    with pytest.raises(ConcurrentRoundError, match="another process registered first"):
        reg.register(_writer(), {}, promote=True, reason="stale", expect_latest=None)
    assert reg.versions() == [v1] and reg.champion() == v1 and len(reg.decisions()) == 1


def test_champion_cas_refuses_a_stale_generation(tmp_path: Path) -> None:
    reg = _reg(tmp_path)
    v1 = reg.register(_writer(), {}, promote=True, reason="a", expect_latest=None)
    v2 = reg.register(_writer(), {}, promote=False, reason="b", expect_latest=v1)
    g = reg.champion_state().generation
    reg.set_champion(v2, "manual", decision="manual-promote", expect_generation=g)
    with pytest.raises(ConcurrentRoundError, match="generation"):
        reg.set_champion(v1, "stale writer", expect_generation=g)
    assert reg.champion_state().version == v2 and reg.champion_state().generation == g + 1


def test_rollback_never_overwrites_a_newer_champion(tmp_path: Path) -> None:
    reg = _reg(tmp_path)
    v1 = reg.register(_writer(), {}, promote=True, reason="a", expect_latest=None)
    v2 = reg.register(_writer(), {"parent": v1}, promote=True, reason="b", expect_latest=v1)
    v3 = reg.register(_writer(), {"parent": v2}, promote=True, reason="c", expect_latest=v2)
    # Serving judged v2 bad, but a round promoted v3 meanwhile: v3 stays champion.
    reg.mark_rolled_back(v2, "error rate", to=v1)
    assert reg.champion() == v3
    last = reg.decisions()[-1]
    assert last["decision"] == "rollback" and last["version"] == v2 and last["champion_kept"] == v3
    reg.mark_rolled_back(v3, "p99", to=v2)
    assert reg.champion() == v2


def test_legacy_champion_file_reads_as_generation_zero(tmp_path: Path) -> None:
    reg = _reg(tmp_path)
    v1 = reg.register(_writer(), {}, promote=False, reason="a", expect_latest=None)
    (reg.root / "champion.json").write_text(json.dumps({"version": v1}))
    assert reg.champion_state().generation == 0
    reg.set_champion(v1, "again")
    assert reg.champion_state().generation == 1


def test_interrupted_register_is_repaired_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reg = _reg(tmp_path)
    v1 = reg.register(_writer(), {}, promote=True, reason="a", expect_latest=None)

    class Killed(BaseException):
        pass

    def die(*a: Any, **k: Any) -> None:
        raise Killed  # the process "dies" right after the rename made the version visible

    with monkeypatch.context() as m:
        m.setattr(Registry, "_apply_decision", die)
        with pytest.raises(Killed):
            reg.register(_writer(), {"parent": v1}, promote=True, reason="better", expect_latest=v1)
    v2 = reg.latest()
    assert v2 == 2 and reg.champion() == v1  # visible, but undecided
    assert [d["version"] for d in reg.decisions()] == [v1]

    fresh = Registry(reg.root)
    written = fresh.repair()
    assert [(d.version, d.decision, d.repaired) for d in written] == [(v2, "promote", True)]
    assert fresh.champion() == v2
    assert fresh.repair() == []  # idempotent
    assert [d["version"] for d in fresh.decisions()] == [v1, v2]


def test_interrupted_promotion_is_not_applied_over_a_newer_champion(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reg = _reg(tmp_path)
    v1 = reg.register(_writer(), {}, promote=True, reason="a", expect_latest=None)
    v2 = reg.register(_writer(), {}, promote=False, reason="b", expect_latest=v1)

    def die(*a: Any, **k: Any) -> None:
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(Registry, "_apply_decision", die)
        with pytest.raises(KeyboardInterrupt):
            reg.register(_writer(), {}, promote=True, reason="c", expect_latest=v2)
    # An operator promotes v2 by hand before anything repairs v3 ...
    reg.set_champion(v2, "manual", decision="manual-promote")
    written = reg.repair()
    assert [(d.version, d.decision) for d in written] == [(3, "reject")]
    assert "superseded" in written[0].reason and reg.champion() == v2


def test_register_repairs_before_it_allocates(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reg = _reg(tmp_path)

    def die(*a: Any, **k: Any) -> None:
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(Registry, "_apply_decision", die)
        with pytest.raises(KeyboardInterrupt):
            reg.register(_writer(), {}, promote=True, reason="a", expect_latest=None)
    v2 = reg.register(_writer(), {}, promote=False, reason="b", expect_latest=1)
    assert v2 == 2 and reg.champion() == 1
    assert [(d["version"], d["decision"]) for d in reg.decisions()] == [
        (1, "promote"),
        (2, "reject"),
    ]


def test_rollout_state_round_trips_and_protects_its_versions(tmp_path: Path) -> None:
    reg = _reg(tmp_path, keep=2)
    empty = reg.rollout_state()
    assert (empty.serving, empty.previous, empty.watch_since) == (None, None, None)
    v1 = reg.register(_writer(), {}, promote=True, reason="a", expect_latest=None)
    reg.set_rollout_state(RolloutState(serving=v1, previous=None, watch_since=123.0))
    latest = v1
    for _ in range(4):
        latest = reg.register(_writer(), {}, promote=True, reason="n", expect_latest=latest)
    st = Registry(reg.root).rollout_state()
    assert st.serving == v1 and st.watch_since == 123.0
    assert v1 in reg.versions()  # serving's version survives pruning
    assert 2 not in reg.versions()


def test_tampered_version_still_refused(tmp_path: Path) -> None:
    reg = _reg(tmp_path)
    v1 = reg.register(_writer(), {}, promote=True, reason="a", expect_latest=None)
    (reg.path(v1) / "vocab.json").write_text('["x"]')
    with pytest.raises(RegistryIntegrityError, match="tampered"):
        reg.verify(v1)


# -- two processes racing -----------------------------------------------------------------
def _race(root: str, barrier: Any, out: Any, i: int, checked: bool) -> None:
    reg = Registry(Path(root))
    base = reg.latest()
    barrier.wait()  # both read the same latest version, then both try to register on it
    try:
        kw: dict[str, Any] = {"expect_latest": base} if checked else {}
        v = reg.register(_writer(float(i)), {"who": i}, promote=True, reason=f"p{i}", **kw)
        out.put((i, "ok", v))
    except ConcurrentRoundError as err:
        out.put((i, "conflict", str(err)))


def _run_race(root: Path, n: int, checked: bool) -> list[tuple[int, str, Any]]:
    ctx = mp.get_context("spawn")
    barrier, out = ctx.Barrier(n), ctx.Queue()
    procs = [
        ctx.Process(target=_race, args=(str(root), barrier, out, i, checked)) for i in range(n)
    ]
    for p in procs:
        p.start()
    results = [out.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    return results


def test_two_processes_racing_on_one_slice_register_once(tmp_path: Path) -> None:
    reg = _reg(tmp_path)
    v1 = reg.register(_writer(), {}, promote=True, reason="a", expect_latest=None)
    results = _run_race(reg.root, 2, checked=True)
    ok = [r for r in results if r[1] == "ok"]
    conflicts = [r for r in results if r[1] == "conflict"]
    assert len(ok) == 1 and len(conflicts) == 1, results
    assert reg.versions() == [v1, 2]
    assert reg.champion() == 2 and reg.champion_state().generation == 2
    assert [d["version"] for d in reg.decisions()] == [v1, 2]


def test_many_processes_never_share_a_version_number(tmp_path: Path) -> None:
    reg = _reg(tmp_path)
    results = _run_race(reg.root, 4, checked=False)
    versions = sorted(r[2] for r in results)
    assert versions == [1, 2, 3, 4], results
    who = {reg.meta(v)["who"] for v in versions}
    assert who == {0, 1, 2, 3}
    assert reg.champion_state().generation == 4
    assert sorted(d["version"] for d in reg.decisions()) == [1, 2, 3, 4]


def test_fault_loop_killed_between_register_and_decision(tmp_path: Path) -> None:
    """The bench row (quick form): a child SIGKILLed in the window, the loop's start-up repairs."""
    from bench.faults_registry import fault_register_decision_kill

    row = fault_register_decision_kill(tmp_path, quick=True)
    (scenario,) = row["scenarios"]
    assert scenario["fault_happened"], row  # the kill landed inside the window
    assert scenario["champion_before_restart"] == 1 and scenario["champion_after"] == 2
    assert row["survived"] and row["lost"] == 0 and row["duplicated"] == 0, row
