"""The long-lived training run: workers kept up across rounds, a killed worker's round resumed."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pytest
import ray

from harness.faults_training import train_worker_pids
from harness.rounds import small_round
from tests.training.data_gen import synthetic_table, watermark_of
from training.config import ModelConfig
from training.data import Examples
from training.model import Recommender
from training.registry import Registry
from training.round import run_round
from training.session import TrainingSession

pytestmark = pytest.mark.integration

N_ITEMS = 200


@pytest.fixture(scope="module", autouse=True)
def local_ray() -> Iterator[None]:
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def registered_round(storage: Path) -> str | None:
    """The round of the run's latest checkpoint that Ray Train's controller has registered."""
    for snap in storage.glob("*/checkpoint_manager_snapshot.json"):
        try:
            latest = json.loads(snap.read_text()).get("latest_checkpoint_result")
            if latest is not None:
                progress = snap.parent / latest["checkpoint_dir_name"] / "progress.json"
                return str(json.loads(progress.read_text()).get("round"))
        except (OSError, ValueError, KeyError):
            continue  # being rewritten (not atomic)
    return None


def examples(n: int, seed: int) -> Examples:
    rng = np.random.default_rng(seed)
    inputs = rng.integers(1, N_ITEMS + 1, size=(n, 20)).astype(np.int64)
    targets = np.roll(inputs, -1, axis=1)
    return Examples(inputs, targets)


def model() -> Recommender:
    cfg = ModelConfig(max_len=20, d_model=32, n_layers=2, text_init=False)  # small_round's
    return Recommender(cfg, N_ITEMS + 1)


def test_rounds_share_the_workers_and_each_returns_its_own_model(tmp_path: Path) -> None:
    cfg = small_round(tmp_path / "ray", epochs=2, max_failures=0)
    session = TrainingSession()
    try:
        init = model()
        seconds, pids, out = [], [], []
        for r in range(3):
            t0 = time.monotonic()
            trained, metrics = session.train(init, None, examples(1500, r), cfg)
            seconds.append(time.monotonic() - t0)
            pids.append(metrics["pid"])
            out.append(trained)
            assert (
                metrics["epoch"] == 1
                and metrics["start_epoch"] == 0
                and np.isfinite(metrics["loss"])
            )
            init = trained
        assert len(set(pids)) == 1, pids  # the same rank-0 process trained every round
        assert session.running
        # Each round starts from the weights it was given and changes them.
        a, b = out[0].state_numpy(), out[1].state_numpy()
        assert any(not np.array_equal(a[k], b[k]) for k in a)
        print("round seconds", [round(s, 2) for s in seconds])
    finally:
        session.close()
    assert not session.running  # close ends the run


def test_a_worker_killed_mid_round_resumes_that_round(tmp_path: Path) -> None:
    storage = tmp_path / "ray"
    cfg = small_round(storage, epochs=4, max_failures=0)
    session = TrainingSession()
    try:
        first, m1 = session.train(model(), None, examples(1000, 1), cfg)
        out: dict[str, Any] = {}

        def second() -> None:
            out["result"] = session.train(first, None, examples(6000, 2), cfg, run_id="r2")

        t = threading.Thread(target=second)
        t.start()
        deadline = time.monotonic() + 300
        while registered_round(storage) != "r2":  # registered, not just uploaded: resumable
            assert time.monotonic() < deadline, "round r2 registered no checkpoint"
            time.sleep(0.05)
        pids = train_worker_pids()
        assert pids
        os.kill(pids[0], signal.SIGKILL)
        t.join(timeout=600)
        assert not t.is_alive()
        _, m2 = out["result"]
        assert not psutil.pid_exists(pids[0]) or psutil.Process(pids[0]).status() == "zombie"
        assert m2["start_epoch"] >= 1, m2  # resumed after its checkpointed epoch, not from 0
        assert m2["pid"] != m1["pid"]  # by a restarted worker group
        assert m2["epoch"] == 3
        # The session goes on after the fault.
        _, m3 = session.train(first, None, examples(800, 3), cfg)
        assert m3["pid"] == m2["pid"] and m3["start_epoch"] == 0
    finally:
        session.close()


def test_rounds_register_one_version_each_through_a_session(tmp_path: Path) -> None:
    reg = Registry(tmp_path / "registry")
    cfg = small_round(tmp_path / "ray", epochs=2, max_failures=0)
    session = TrainingSession()
    try:
        first = synthetic_table(2500, seed=4)
        r1 = run_round(first, first.slice(0, 0), watermark_of(first), reg, cfg,
                       trainer=session.train)  # fmt: skip
        second = synthetic_table(1500, seed=4, start=2500)
        r2 = run_round(second, first, watermark_of(second), reg, cfg, trainer=session.train)
    finally:
        session.close()
    assert (r1.version, r2.version) == (1, 2) and reg.versions() == [1, 2]
    assert reg.meta(2)["parent"] == 1 and r2.items_added > 0  # the table grew between rounds
    assert r1.metrics["train_pid"] == r2.metrics["train_pid"]  # one run served both rounds
    assert r1.phases["train"] > r2.phases["train"]  # the second paid no start-up
