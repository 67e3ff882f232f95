"""The registry on a real S3 server (SeaweedFS): the same protocol without rename or locks."""

from __future__ import annotations

import pickle
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors.numpy import save_file

from streams.storage import ObjectStorage, StorageConfig, open_storage
from training.config import ModelConfig
from training.errors import ConcurrentRoundError, NonFiniteWeightsError, UnknownVersionError
from training.registry import ChampionState, Registry, RegistryIntegrityError, RolloutState

S3 = tuple[str, StorageConfig]


@pytest.fixture(autouse=True)
def _cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Downloads go under the test's directory, not ~/.cache."""
    monkeypatch.setenv("STREAMTUNE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _model_writer(seed: int = 0) -> Any:
    import torch

    from training.model import Recommender, save_weights
    from training.vocab import ItemVocab

    torch.manual_seed(seed)
    model = Recommender(ModelConfig(), 30)
    vocab = ItemVocab([f"i{k}" for k in range(29)])

    def write(d: Path) -> None:
        save_weights(model, d / "model.safetensors")
        vocab.save(d / "vocab.json")

    return write


def _small_writer(value: float) -> Any:
    def write(d: Path) -> None:
        save_file({"w": np.full((4, 3), value, np.float32)}, str(d / "model.safetensors"))

    return write


META = {"model_config": ModelConfig().model_dump(), "watermark": {"events:0": 10}}


def test_round_trip_on_s3(s3_location: S3, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    uri, cfg = s3_location
    reg = Registry(uri, storage=cfg)
    assert reg.location == uri and reg.versions() == [] and reg.champion() is None
    with pytest.raises(Exception, match="not a local directory"):
        _ = reg.root
    v1 = reg.register(_model_writer(1), META, promote=True, reason="first", expect_latest=None)
    v2 = reg.register(_model_writer(2), {**META, "parent": v1}, promote=False, reason="worse",
                      expect_latest=v1)  # fmt: skip
    v3 = reg.register(_model_writer(3), {**META, "parent": v1}, promote=True, reason="better",
                      expect_latest=v2)  # fmt: skip
    reg.set_rollout_state(RolloutState(serving=v3, previous=v1, watch_since=7.0))
    assert reg.mark_rolled_back(v3, "p99 too high", to=v1) == ChampionState(
        version=v1, generation=3
    )
    with pytest.raises(NonFiniteWeightsError):
        reg.register(_small_writer(float("nan")), {}, promote=True, reason="x", expect_latest=v3)

    # Another machine: nothing shared but the bucket (its own cache directory).
    monkeypatch.setenv("STREAMTUNE_CACHE", str(tmp_path / "other-machine"))
    other = Registry(uri, storage=cfg)
    assert other.versions() == [v1, v2, v3]
    assert other.champion_state() == ChampionState(version=v1, generation=3)
    assert [(d["version"], d["decision"]) for d in other.decisions()] == [
        (v1, "promote"),
        (v2, "reject"),
        (v3, "promote"),
        (v3, "rollback"),
    ]
    assert other.rollout_state().serving == v3 and other.rollout_state().watch_since == 7.0
    assert other.version_meta(v2).parent == v1 and other.version_meta(v2).base_generation == 1
    loaded = other.load()  # the champion: downloaded into the cache, verified, loaded
    assert loaded.version == v1 and loaded.path.is_relative_to(tmp_path / "other-machine")
    assert (loaded.path / "vocab.json").exists() and len(loaded.vocab) == 30  # 29 items + padding
    assert other.load(v3).version == v3
    assert other.set_champion(v2, "manual", decision="manual-promote").version == v2
    assert reg.champion() == v2  # the first "machine" sees it
    assert pickle.loads(pickle.dumps(reg)).champion() == v2  # as a Ray task receives it
    # Nothing of the refused NaN upload is left in the bucket: 3 versions, 3 markers.
    store = open_storage(uri, cfg)
    assert len(store.list("uploads/")) == 3
    with pytest.raises(UnknownVersionError):
        other.path(99)


def test_prune_on_s3_deletes_the_objects(s3_location: S3) -> None:
    uri, cfg = s3_location
    reg = Registry(uri, keep=2, storage=cfg)
    latest, prefixes = None, {}
    for i in range(4):
        latest = reg.register(_small_writer(float(i)), {}, promote=True, reason=f"r{i}",
                              expect_latest=latest)  # fmt: skip
        prefixes[latest] = reg.log.refresh().versions[latest].prefix
    assert reg.versions() == [3, 4]
    store = open_storage(uri, cfg)
    assert [len(store.list(f"{prefixes[v]}/")) for v in (1, 2, 3, 4)] == [0, 0, 2, 2]
    assert len(store.list("uploads/")) == 2
    assert reg.repair(older_than_s=0) == [] and reg.versions() == [3, 4]
    assert reg.verify(3)["version"] == 3  # repair never touches a live version


def _racer(uri: str, cfg: StorageConfig, out: list[Any], i: int, checked: bool) -> None:
    reg = Registry(uri, storage=cfg)  # one object per "process": nothing shared but S3
    base = reg.latest()
    try:
        kw: dict[str, Any] = {"expect_latest": base} if checked else {}
        v = reg.register(_small_writer(float(i)), {"who": i}, promote=True, reason=f"p{i}", **kw)
        out.append((i, "ok", v))
    except ConcurrentRoundError as err:
        out.append((i, "conflict", str(err)))
    except BaseException as err:  # surfaced by the test, never swallowed
        out.append((i, "error", repr(err)))


def _race(
    uri: str, cfg: StorageConfig, n: int, checked: bool, monkeypatch: pytest.MonkeyPatch
) -> tuple[list[Any], int]:
    """n writers upload, wait for each other, then all try to commit at once. Returns their
    results and how many create-only log writes lost (so re-decided on a newer state)."""
    barrier, lost = threading.Barrier(n), [0]
    out: list[Any] = []
    upload, create = Registry._upload, ObjectStorage.create

    def upload_then_wait(self: Registry, *a: Any) -> None:
        upload(self, *a)
        barrier.wait(timeout=60)

    def counting_create(self: ObjectStorage, key: str, data: bytes) -> bool:
        won = create(self, key, data)
        if key.startswith("_log/") and not won:
            lost[0] += 1
        return won

    monkeypatch.setattr(Registry, "_upload", upload_then_wait)
    monkeypatch.setattr(ObjectStorage, "create", counting_create)
    threads = [threading.Thread(target=_racer, args=(uri, cfg, out, i, checked)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    monkeypatch.undo()
    return out, lost[0]


def test_concurrent_writers_on_s3_never_share_a_number(
    s3_location: S3, monkeypatch: pytest.MonkeyPatch
) -> None:
    uri, cfg = s3_location
    results, lost = _race(uri, cfg, 6, checked=False, monkeypatch=monkeypatch)
    assert sorted(r[2] for r in results) == [1, 2, 3, 4, 5, 6], results
    assert lost > 0  # the race happened: some writers lost an entry number and re-decided
    reg = Registry(uri, storage=cfg)
    assert {reg.meta(v)["who"] for v in reg.versions()} == set(range(6))
    assert sorted(d["version"] for d in reg.decisions()) == [1, 2, 3, 4, 5, 6]  # none lost
    assert reg.champion_state().generation == 6
    for v in reg.versions():
        assert reg.meta(v)["version"] == v  # meta.json was written for the number it got


def test_stale_expect_latest_loses_on_s3(s3_location: S3, monkeypatch: pytest.MonkeyPatch) -> None:
    uri, cfg = s3_location
    v1 = Registry(uri, storage=cfg).register(
        _small_writer(0.0), {}, promote=True, reason="a", expect_latest=None
    )
    results, lost = _race(uri, cfg, 3, checked=True, monkeypatch=monkeypatch)
    ok = [r for r in results if r[1] == "ok"]
    conflicts = [r for r in results if r[1] == "conflict"]
    assert len(ok) == 1 and len(conflicts) == 2, results
    assert lost > 0  # refused when re-deciding after losing the entry, not by the early check
    reg = Registry(uri, storage=cfg)
    assert reg.versions() == [v1, 2] and reg.champion() == 2
    assert [d["version"] for d in reg.decisions()] == [v1, 2]
    assert len(open_storage(uri, cfg).list("uploads/")) == 2  # the losers' uploads are gone


@pytest.mark.parametrize("name", ["vocab.json", "model.safetensors", "meta.json"])
def test_a_tampered_object_on_s3_is_refused(
    s3_location: S3, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    uri, cfg = s3_location
    reg = Registry(uri, storage=cfg)
    v1 = reg.register(_model_writer(), META, promote=True, reason="a", expect_latest=None)
    store = open_storage(uri, cfg)
    key = f"{reg.log.refresh().versions[v1].prefix}/{name}"
    data = bytearray(store.read(key))
    data[-3] ^= 0xFF
    store.write(key, bytes(data))
    monkeypatch.setenv("STREAMTUNE_CACHE", str(tmp_path / "fresh"))  # a reader with no copy
    fresh = Registry(uri, storage=cfg)
    with pytest.raises(RegistryIntegrityError, match="tampered"):
        fresh.load(v1)
    assert not list((tmp_path / "fresh").rglob(name))  # nothing unverified reached the cache


def test_history_parts_are_stored_once_and_outlive_pruned_versions_on_s3(
    s3_location: S3, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.training.test_histories_registry import (
        as_dict,
        expected,
        run_rounds,
        sample_rounds,
    )

    uri, cfg = s3_location
    reg = Registry(uri, keep=2, storage=cfg)
    store = open_storage(uri, cfg)
    rounds = [{f"u{i}": [1 + i % 50] for i in range(5_000)}]
    run_rounds(reg, rounds)
    snapshot = sum(o.size for o in store.list("blobs/"))
    uploaded = []
    for new in sample_rounds(5, 5_000, 20):
        before = {o.key for o in store.list("blobs/")}
        run_rounds(reg, [new])
        rounds.append(new)
        uploaded.append(sum(o.size for o in store.list("blobs/") if o.key not in before))
    assert max(uploaded) < snapshot / 10, (snapshot, uploaded)
    assert reg.versions() == [5, 6]  # the versions that wrote the snapshot are pruned
    # Only the parts of live versions are left in the bucket.
    used = {n for v in reg.versions() for n in reg.log.refresh().versions[v].files if "/" in n}
    assert {o.key.removeprefix("blobs/") for o in store.list("blobs/")} == {
        n.removeprefix("shared/") for n in used
    }
    # Another machine: a fresh cache, every part downloaded and verified once.
    monkeypatch.setenv("STREAMTUNE_CACHE", str(tmp_path / "other-machine"))
    other = Registry(uri, storage=cfg)
    assert as_dict(other.read_histories(6)) == expected(rounds)
    assert other.verify(5)["version"] == 5
    assert reg.repair(older_than_s=0) == [] and as_dict(reg.read_histories(6)) == expected(rounds)
