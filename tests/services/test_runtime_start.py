"""A local Ray lives as long as the process that started it, whichever thread started it."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import psutil
import pytest

from services.settings import Settings
from serving.config import ServingConfig
from streams.broker import free_port
from tests.serving.test_ingress import restore_env  # noqa: F401 (a fixture)

pytestmark = pytest.mark.integration


def test_ray_started_from_a_thread_outlives_that_thread(
    tmp_path: Path,
    restore_env: None,  # noqa: F811
) -> None:
    """The demo starts Ray from its work thread, which ends at a stop. Ray's GCS and raylet die
    with the thread that forked them (PR_SET_PDEATHSIG), so they must not be forked by it."""
    import ray

    from services.runtime import init_ray

    s = Settings(state_dir=tmp_path / "state", serving=ServingConfig(port=free_port()))
    worker = threading.Thread(target=init_ray, args=(None, s, False))
    worker.start()
    worker.join()
    try:
        time.sleep(1.0)  # the kernel's signal to them would have landed by now
        core = [p for p in psutil.Process().children(recursive=True)
                if p.name() in ("raylet", "gcs_server")]  # fmt: skip
        assert sorted(p.name() for p in core) == ["gcs_server", "raylet"]
        assert all(p.status() != psutil.STATUS_ZOMBIE for p in core)
        assert ray.get(ray.remote(lambda: 41 + 1).remote(), timeout=60) == 42
        # Ray's workers run with the local Ray's settings (no preemption watcher per run)
        watcher = ray.remote(lambda: os.environ.get("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"))
        assert ray.get(watcher.remote(), timeout=60) == "0"
    finally:
        ray.shutdown()


class _Started:
    """``init_ray`` for the start-up's order alone: records that it ran and waits for the
    broker's start to be under way, which only a start side by side lets happen."""

    def __init__(self) -> None:
        self.broker_started = threading.Event()
        self.ray_ran = False

    def init_ray(self, address: str | None, s: Settings) -> None:
        assert self.broker_started.wait(10), "the broker starts only after Ray"
        self.ray_ran = True

    def broker(self) -> None:
        self.broker_started.set()


def test_broker_starts_beside_ray_and_its_error_comes_after_ray(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from services import runtime

    s = Settings(state_dir=tmp_path / "state")

    def started() -> _Started:
        got = _Started()
        monkeypatch.setattr(runtime, "init_ray", got.init_ray)
        return got

    got = started()
    assert runtime.start_broker_and_ray(None, s, threading.Event(), got.broker)
    assert got.ray_ran

    def broken() -> None:
        got.broker_started.set()
        raise RuntimeError("no jars")

    got = started()
    with pytest.raises(RuntimeError, match="no jars"):
        runtime.start_broker_and_ray(None, s, threading.Event(), broken)
    assert got.ray_ran  # Ray's start was not cut short: the stop that follows stops both

    stop = threading.Event()
    stop.set()  # a signal before the start: the broker is still started (and joined), Ray not
    got = started()
    assert not runtime.start_broker_and_ray(None, s, stop, got.broker)
    assert got.broker_started.is_set() and not got.ray_ran
