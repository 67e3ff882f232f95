"""The registry's write discipline: one writer per fact, CAS on the champion, repair, refusals."""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors.numpy import save_file

from training.errors import ConcurrentRoundError, NonFiniteWeightsError
from training.registry import (
    ChampionState,
    Registry,
    RegistryEntry,
    RegistryIntegrityError,
    RolloutState,
)


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


def test_decision_and_champion_move_are_one_log_entry(tmp_path: Path) -> None:
    reg = _reg(tmp_path)
    v1 = reg.register(_writer(), {}, promote=True, reason="first", expect_latest=None)
    entries = sorted((reg.root / "_log").glob("*[0-9].json"))
    assert len(entries) == 1  # one create-only object made the version, decision and champion
    entry = RegistryEntry.model_validate_json(entries[0].read_bytes())
    assert entry.kind == "register" and [r.version for r in entry.add] == [v1]
    assert entry.champion is not None and entry.champion.version == v1
    assert [(d.version, d.decision, d.reason) for d in entry.decisions] == [
        (v1, "promote", "first")
    ]
    assert entry.add[0].files["meta.json"] and entry.add[0].files["model.safetensors"]


def test_the_decision_is_made_on_the_state_at_commit_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The champion moves (another process) while this writer uploads: its promotion is decided
    against the new generation, in the entry, not against what it read before uploading."""
    reg = _reg(tmp_path)
    v1 = reg.register(_writer(), {}, promote=False, reason="a", expect_latest=None)
    other = Registry(reg.root)
    upload = Registry._upload

    def upload_then_other_moves_champion(self: Registry, *a: Any) -> None:
        upload(self, *a)
        other.set_champion(v1, "operator", decision="manual-promote")

    monkeypatch.setattr(Registry, "_upload", upload_then_other_moves_champion)
    v2 = reg.register(_writer(), {"parent": v1}, promote=True, reason="b", expect_latest=v1)
    assert reg.champion_state() == ChampionState(version=v2, generation=2)
    assert reg.version_meta(v2).base_generation == 1
    assert [(d["version"], d["decision"]) for d in reg.decisions()] == [
        (v1, "reject"),
        (v1, "manual-promote"),
        (v2, "promote"),
    ]


@pytest.mark.parametrize("checked", [False, True])
def test_a_writer_beaten_to_the_entry_re_decides(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, checked: bool
) -> None:
    """Writer A loses the create-only write of its entry to writer B (a separate object, as a
    separate process would be): A folds B's entry and decides again - a fresh number, or a
    refusal when it built on the version B just superseded."""
    a = _reg(tmp_path)
    v1 = a.register(_writer(), {}, promote=True, reason="first", expect_latest=None)
    b = Registry(a.root)
    create = a.storage.create
    lost: list[str] = []

    def create_after_b(key: str, data: bytes) -> bool:
        if key.startswith("_log/") and not lost:
            lost.append(key)
            b.register(_writer(2.0), {"who": "b"}, promote=False, reason="b", expect_latest=v1)
        return create(key, data)

    monkeypatch.setattr(a.storage, "create", create_after_b)
    kw: dict[str, Any] = {"expect_latest": v1} if checked else {}
    if checked:
        with pytest.raises(ConcurrentRoundError, match="another process registered first"):
            a.register(_writer(3.0), {"who": "a"}, promote=True, reason="a", **kw)
        assert lost and a.versions() == [v1, 2] and a.champion() == v1
        assert len(list((a.root / "uploads").iterdir())) == 2  # v1's and b's markers only
        live = {a.path(v).name for v in a.versions()}
        assert {p.name for p in (a.root / "versions").iterdir()} == live  # A's upload removed
    else:
        v = a.register(_writer(3.0), {"who": "a"}, promote=True, reason="a", **kw)
        assert lost and v == 3 and a.meta(3)["who"] == "a" and a.meta(2)["who"] == "b"
        assert a.meta(3)["version"] == 3 and a.champion() == 3
    assert [d["version"] for d in Registry(a.root).decisions()] == a.versions()


def test_a_registry_travels_to_other_processes_by_pickle(tmp_path: Path) -> None:
    """Rounds run as Ray tasks: the (pinned) registry is pickled there and rebuilt."""
    reg = _reg(tmp_path, keep=3)
    v1 = reg.register(_writer(), {}, promote=True, reason="a", expect_latest=None)
    pinned = pickle.loads(pickle.dumps(reg.expecting(v1)))
    copy = pickle.loads(pickle.dumps(reg))
    assert copy.keep == 3 and copy.champion() == v1
    reg.register(_writer(), {}, promote=False, reason="other", expect_latest=v1)
    with pytest.raises(ConcurrentRoundError, match="read after version 1"):
        pinned.register(_writer(), {}, promote=True, reason="late", expect_latest=2)
    assert copy.latest() == 2  # a rebuilt reader follows the log


def _old_layout_version(root: Path, v: int, complete: bool = True) -> None:
    d = root / f"v{v:06d}"
    d.mkdir(parents=True)
    _writer(float(v))(d)
    files = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir())}
    meta = {"version": v, "created_at": 1.0, "files": files, "watermark": {"t:0": v * 10}}
    (d / "meta.json").write_text(json.dumps(meta))
    if complete:
        (d / "_SUCCESS").write_text(files["model.safetensors"])


def test_an_older_layout_registry_is_adopted_once(tmp_path: Path) -> None:
    root = tmp_path / "reg"
    for v in (1, 2):
        _old_layout_version(root, v)
    _old_layout_version(root, 3, complete=False)  # its writer died before the marker
    (root / "champion.json").write_text(json.dumps({"version": 1}))  # no generation: oldest form
    (root / "decisions.jsonl").write_text(
        json.dumps({"ts": 1.0, "version": 1, "decision": "promote", "reason": "first"})
        + '\n{"ts": 2.0, "vers'  # torn last line of a crashed append
    )
    (root / "rollout.json").write_text(json.dumps({"serving": 1, "watch_since": 5.0}))

    reg = Registry(root)
    assert reg.versions() == [1, 2] and reg.champion_state() == ChampionState(version=1)
    assert [(d.version, d.decision, d.repaired) for d in reg.decision_log()] == [
        (1, "promote", False),
        (2, "reject", True),  # complete but never decided: adopted as rejected
    ]
    assert reg.rollout_state().serving == 1 and reg.meta(2)["watermark"] == {"t:0": 20}
    assert reg.path(1) == root / "v000001" and reg.verify(1)["version"] == 1
    assert Registry(root).versions() == [1, 2]  # a second open adopts nothing more
    assert len(list((root / "_log").glob("*[0-9].json"))) == 1
    v4 = reg.register(_writer(), {}, promote=True, reason="new", expect_latest=2)
    assert v4 == 4  # 3 was used (incompletely) by the old layout: never reused
    assert reg.champion_state() == ChampionState(version=4, generation=1)
    (root / "v000002" / "vocab.json").write_text('["x"]')
    with pytest.raises(RegistryIntegrityError, match="tampered"):
        reg.verify(2)


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


# -- a writer SIGKILLed between its upload and its commit ------------------------------------
_KILLED_CHILD = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    import numpy as np
    from safetensors.numpy import save_file
    from streams.storage import LocalStorage
    from training.registry import Registry

    root, ready = Path(sys.argv[1]), Path(sys.argv[2])

    def write(d):
        save_file({"w": np.ones((4, 3), np.float32)}, str(d / "model.safetensors"))
        (d / "vocab.json").write_text("[]")

    reg = Registry(root)
    v1 = reg.register(write, {}, promote=True, reason="first", expect_latest=None)
    create = LocalStorage.create

    def stall(self, key, data):
        if key.startswith("_log/"):
            ready.write_text(key)  # files and meta.json are written; the entry is next
            time.sleep(3600)  # SIGKILL arrives here
        return create(self, key, data)

    LocalStorage.create = stall
    reg.register(write, {"parent": v1}, promote=True, reason="better", expect_latest=v1)
    print("unreachable: the register completed", flush=True)
    """
)


def test_a_writer_killed_before_its_commit_leaves_garbage_never_a_version(tmp_path: Path) -> None:
    root, ready = tmp_path / "reg", tmp_path / "ready"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    child = subprocess.Popen(
        [sys.executable, "-c", _KILLED_CHILD, str(root), str(ready)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 120
    while not ready.exists():
        if child.poll() is not None or time.monotonic() > deadline:
            child.kill()
            raise AssertionError(f"never reached the window: {child.communicate()[1][-800:]!r}")
        time.sleep(0.02)
    os.kill(child.pid, signal.SIGKILL)
    child.wait(timeout=30)
    assert child.returncode == -signal.SIGKILL

    reg = Registry(root)
    (orphan,) = [p for p in (root / "versions").iterdir() if p != reg.path(1)]
    # The fault happened inside the window: the files and a meta.json saying "promote" exist ...
    assert json.loads((orphan / "meta.json").read_text())["decision"] == "promote"
    assert (root / "uploads" / orphan.name).exists()
    # ... and nothing of it is visible: no version, no decision, champion unmoved.
    assert reg.versions() == [1] and reg.champion_state() == ChampionState(version=1, generation=1)
    assert [d["version"] for d in reg.decisions()] == [1]
    assert reg.repair() == [] and orphan.exists()  # young: could be a live writer's upload
    assert reg.repair(older_than_s=0) == [] and not orphan.exists()
    assert not (root / "uploads" / orphan.name).exists()
    v2 = reg.register(_writer(), {"parent": 1}, promote=True, reason="again", expect_latest=1)
    assert v2 == 2 and reg.champion() == 2
    assert [(d["version"], d["decision"]) for d in reg.decisions()] == [
        (1, "promote"),
        (2, "promote"),
    ]


def test_a_cold_reader_folds_from_the_log_checkpoint(tmp_path: Path) -> None:
    reg = _reg(tmp_path, keep=2)
    latest = None
    for i in range(3):
        latest = reg.register(_writer(), {"parent": latest}, promote=True, reason=f"r{i}",
                              expect_latest=latest)  # fmt: skip
    for i in range(110):  # past the log's checkpoint (every 100 entries)
        reg.set_rollout_state(RolloutState(serving=latest, previous=2, watch_since=float(i)))
    assert (reg.root / "_log" / "_latest").exists()
    cold = Registry(reg.root)
    assert cold.versions() == reg.versions() == [2, 3]  # 1 pruned (keep=2)
    assert cold.champion_state() == reg.champion_state() == ChampionState(version=3, generation=3)
    assert cold.rollout_state().watch_since == 109.0 and cold.decisions() == reg.decisions()
    assert cold.verify(2)["version"] == 2
    v4 = cold.register(_writer(), {}, promote=False, reason="after", expect_latest=3)
    assert v4 == 4  # pruned numbers are never reused


def test_fault_loop_killed_mid_registration(tmp_path: Path) -> None:
    # bench.faults' row: SIGKILL after the upload, before the commit; restart; retry; repair.
    from harness.faults_registry import fault_register_decision_kill

    result = fault_register_decision_kill(tmp_path, quick=False)
    assert all(s["fault_happened"] for s in result["scenarios"]), result["detail"]
    assert all(s["versions_after_restart"] == [1] for s in result["scenarios"])
    assert result["survived"] and result["lost"] == 0 and result["duplicated"] == 0
