"""A long-lived run's client: picklable, usable from a Ray task, idempotent per round id, a
round whose poster died with its data parked until posted again, and failing (not waiting
forever) once the run is gone."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import ray

from harness.rounds import small_round
from tests.training.test_session import examples, model
from training.errors import RoundFailedError
from training.feeder import IDLE, ROUND_ATTEMPTS, RoundFeeder
from training.model import Recommender
from training.round import RoundConfig, round_job
from training.session import SessionClient, TrainingSession

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@ray.remote(num_cpus=0)
def _round_in_a_task(
    client: SessionClient, init: Recommender, cfg: RoundConfig, run_id: str
) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """What a round task on a training node does with the driver's client."""
    trained, metrics = client(init, None, examples(600, 1), cfg, run_id=run_id)
    return trained.state_numpy(), metrics


@ray.remote(num_cpus=0)
class _Poster:
    """Owns what it puts: killed, it takes the data along (as a lost node takes a round task)."""

    def put(self, data: dict[str, Any]) -> list[Any]:
        return [ray.put(data)]  # (in a list: the caller gets the ref, not the data)


def _wait_lost(ref: Any, timeout_s: float = 60) -> None:
    """Until Ray knows the object is gone with its owner (a kill takes effect asynchronously)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            ray.get(ref, timeout=5)
        except ray.exceptions.ObjectLostError:
            return
        time.sleep(0.2)
    raise AssertionError("the killed poster's object is still readable")


def test_a_round_from_a_task_trains_once_however_often_it_is_posted(
    local_ray: None, tmp_path: Path
) -> None:
    cfg = small_round(tmp_path / "ray", epochs=2, max_failures=0)
    session = TrainingSession()
    init = model()
    try:
        client = session.client(cfg)
        assert session.running
        task = _round_in_a_task.remote(client, init, cfg, "r1")
        state, metrics = ray.get(task, timeout=600)  # (minutes only on a crowded machine)
        assert metrics["epoch"] == 1 and np.isfinite(metrics["loss"])
        # A retried round task posts the same round again: the result, not a second round.
        again, metrics2 = session.train(init, None, examples(600, 1), cfg, run_id="r1")
        assert metrics2 == metrics
        assert all(np.array_equal(again.state_numpy()[k], v) for k, v in state.items())
        stats = ray.get(client.feeder.stats.remote())
        assert stats["handed_out"] == 1 and stats["queued"] == [], stats

        # A round whose poster died with its data (a round task on a lost node): the workers
        # park it instead of failing, and the retried poster's data trains it.
        data, job_config = round_job(init, None, examples(600, 2), cfg, cold=False)
        poster = _Poster.remote()  # type: ignore[attr-defined]
        (dead_ref,) = ray.get(poster.put.remote(data))
        ray.kill(poster)
        _wait_lost(dead_ref)
        ray.get(client.feeder.post.remote("r2", {"data": [dead_ref], "config": job_config}))
        deadline = time.monotonic() + 120
        while ray.get(client.feeder.stats.remote())["parked"] != ["r2"]:
            assert time.monotonic() < deadline, ray.get(client.feeder.stats.remote())
            time.sleep(0.2)
        _, metrics3 = session.train(init, None, examples(600, 2), cfg, run_id="r2")
        assert metrics3["start_epoch"] == 0 and metrics3["pid"] == metrics["pid"]  # same run
        assert ray.get(client.feeder.stats.remote())["handed_out"] == 2  # the parked one: none
    finally:
        session.close()
    assert not session.running
    with pytest.raises(RoundFailedError, match="gone"):
        client(init, None, examples(100, 2), cfg, run_id="r2")
    with pytest.raises(RoundFailedError, match="closed"):
        session.client(cfg)


def test_a_waiting_client_fails_when_the_run_ends(local_ray: None, tmp_path: Path) -> None:
    cfg = small_round(tmp_path / "ray", epochs=2, max_failures=0)
    feeder = ray.remote(num_cpus=0, max_concurrency=8)(RoundFeeder).remote()  # type: ignore[call-overload]
    client = SessionClient(feeder, "no-workers", poll_s=0.5)
    out: dict[str, Any] = {}

    def wait() -> None:
        try:
            client(model(), None, examples(50, 3), cfg, run_id="lonely")
        except RoundFailedError as err:
            out["error"] = err

    waiter = threading.Thread(target=wait)
    waiter.start()
    deadline = time.monotonic() + 60
    while not ray.get(feeder.stats.remote())["queued"]:  # posted, and waiting for workers
        assert time.monotonic() < deadline
        time.sleep(0.1)
    ray.get(feeder.end.remote("WorkerGroupError: boom"))  # what the driver does when fit ends
    waiter.join(timeout=30)
    assert not waiter.is_alive() and "boom" in str(out.get("error")), out


def _job() -> dict[str, Any]:
    return {"data": ["ref"], "config": {}}


def test_the_feeder_keeps_a_reposted_round_in_place_and_parks_lost_data() -> None:
    feeder = RoundFeeder()
    feeder.post("a", _job())
    assert feeder.next_round(0.01) == ("a", 0)
    feeder.post("a", _job())  # a retried poster: same round, its data
    assert feeder.stats()["queued"] == ["a"]
    assert feeder.job("a", 0) is None and feeder.job("a", 1) is not None
    feeder.not_taken("a", 0)  # a group read the old data: the attempt does not count
    assert feeder.stats()["handed_out"] == 0 and feeder.job("a", 1) is not None
    assert feeder.next_round(0.01) == ("a", 1)
    feeder.not_taken("a", 1)  # its poster died with the data: parked until posted again
    assert feeder.next_round(0.01) == IDLE and feeder.stats()["parked"] == ["a"]
    feeder.post("a", _job())
    assert feeder.next_round(0.01) == ("a", 2)
    feeder.round_done("a", {"w": np.zeros(1)}, {"loss": 1.0})
    feeder.post("a", _job())  # finished: not queued again, its result is handed out again
    assert feeder.next_round(0.01) == IDLE
    first, second = feeder.result("a", 0.01), feeder.result("a", 0.01)
    assert first is not None and first is second and first.error is None


def test_the_feeder_fails_a_round_that_no_group_survives() -> None:
    feeder = RoundFeeder()
    feeder.post("b", _job())
    for _ in range(ROUND_ATTEMPTS):
        assert feeder.next_round(0.01) == ("b", 0)  # each a worker group that died on it
    assert feeder.next_round(0.01) == IDLE
    outcome = feeder.result("b", 0.01)
    assert outcome is not None and outcome.error is not None and "failed" in outcome.error
    feeder.stop()
    assert feeder.next_round(0.01) is None


def test_the_feeders_module_imports_no_torch() -> None:
    """Ray imports an actor's class module in its process: the feeder's must stay torch-free, or
    the session's feeder costs a torch import (0.7 GiB RSS at 1M users) for nothing."""
    code = "import sys, training.feeder; print(sorted(m for m in sys.modules if m == 'torch'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
