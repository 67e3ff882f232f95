"""Supervised components of `up`: a crash is restarted and counted, or `up` exits naming it.

Crashes are injected from outside the production code: a method monkeypatched to raise (in this
process, or in a wrapper script for the `up` subprocess), or the history actor killed with
``ray.kill``.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import ray

from services.config import SupervisorConfig
from services.loop import ContinualLoop
from services.runtime import Running, start
from services.settings import Settings, load_settings
from services.stopping import stop_threads
from services.supervisor import ComponentFailed, Supervisor
from serving.rollout import RolloutController
from streams.admin import ensure_topics
from streams.broker import free_port
from streams.config import KafkaConfig
from streams.datasets import DriftSpec, synthetic_drift
from streams.ingest import Ingestor
from streams.producer import replay
from tests.services.test_metrics import scrape, small_env, value

FAST = SupervisorConfig(max_restarts=2, window_s=60, backoff_s=0.05, backoff_max_s=0.2)


# -- the supervisor on its own ---------------------------------------------------------------


def test_a_crashed_component_is_restarted_with_backoff_and_counted() -> None:
    calls: list[float] = []
    restarted: list[str] = []

    def flaky(stop: threading.Event) -> None:
        calls.append(time.monotonic())
        if len(calls) <= 2:
            raise RuntimeError(f"crash {len(calls)}")
        stop.wait()

    sup = Supervisor(FAST, on_restart=lambda name, err: restarted.append(name))
    sup.add("flaky", flaky)
    deadline = time.time() + 10
    while len(calls) < 3 and time.time() < deadline:
        time.sleep(0.01)
    assert len(calls) == 3 and sup.restarts["flaky"] == 2 and restarted == ["flaky", "flaky"]
    assert calls[2] - calls[1] >= 2 * FAST.backoff_s * 0.9  # the backoff doubled
    assert sup.failure is None and not sup.stop.is_set()
    assert sup.errors["flaky"] == ["RuntimeError: crash 1", "RuntimeError: crash 2"]
    sup.stop.set()
    assert sup.join(5) == []


def test_a_failing_restart_report_is_logged_and_supervision_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    calls: list[int] = []

    def flaky(stop: threading.Event) -> None:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("crash")
        stop.wait()

    def report(name: str, err: BaseException) -> None:
        raise ValueError("metrics away")

    sup = Supervisor(FAST, on_restart=report)
    with caplog.at_level(logging.WARNING, logger="services.supervisor"):
        sup.add("flaky", flaky)
        deadline = time.time() + 10
        while len(calls) < 2 and time.time() < deadline:
            time.sleep(0.01)
        sup.stop.set()
        assert sup.join(5) == []
    assert len(calls) == 2 and sup.restarts["flaky"] == 1  # restarted although the report failed
    said = [r.getMessage() for r in caplog.records if "counting" in r.getMessage()]
    assert said == ["counting flaky's restart failed (ValueError: metrics away); the dashboards "
                    "miss it"], caplog.text  # fmt: skip


def test_too_many_restarts_stop_everything_and_name_the_component() -> None:
    def broken(stop: threading.Event) -> None:
        raise ValueError("disk on fire")

    def healthy(stop: threading.Event) -> None:
        stop.wait()

    sup = Supervisor(FAST)
    sup.add("healthy", healthy)
    sup.add("broken", broken)
    assert sup.stop.wait(10), "exhaustion did not stop the service"
    assert isinstance(sup.failure, ComponentFailed)
    assert sup.failure.component == "broken" and sup.restarts["broken"] == FAST.max_restarts
    assert "'broken'" in str(sup.failure) and "ValueError: disk on fire" in str(sup.failure)
    assert sup.join(5) == []  # the healthy one was stopped too


def test_a_component_that_returns_unasked_counts_as_dead() -> None:
    runs: list[int] = []

    def quits(stop: threading.Event) -> None:
        runs.append(1)

    sup = Supervisor(FAST)
    sup.add("quits", quits)
    assert sup.stop.wait(10)
    assert sup.failure is not None and "returned without being stopped" in str(sup.failure)
    assert len(runs) == FAST.max_restarts + 1


# -- every component of a running system -----------------------------------------------------

EVENTS = list(synthetic_drift(DriftSpec(users=30, events=600, seed=9)))


@pytest.fixture(scope="module")
def system(kafka: KafkaConfig, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    state = tmp_path_factory.mktemp("supstate")
    env = {
        **small_env(kafka, state, free_port()),
        "STREAMTUNE_TOPICS__EVENTS": f"sup-{state.name}.events",
        "STREAMTUNE_TOPICS__DEAD_LETTER": f"sup-{state.name}.dlq",
        # No round: this is about the threads. (A round still training at the teardown's
        # ray.shutdown ends this process from the round's thread.)
        "STREAMTUNE_LOOP__FIRST_ROUND_EVENTS": "1000000",
        "STREAMTUNE_LOOP__FIRST_ROUND_WAIT_S": "100000",
        "STREAMTUNE_LOOP__MAX_PENDING_S": "100000",
        "STREAMTUNE_LOOP__POLL_S": "0.2",
        "STREAMTUNE_ROLLOUT__POLL_S": "0.2",
        "STREAMTUNE_SUPERVISOR__LIVENESS_S": "0.5",
        "STREAMTUNE_SUPERVISOR__LIVENESS_TIMEOUT_S": "5",
    }
    old = dict(os.environ)
    os.environ.update(env)
    s: Settings = load_settings()
    ensure_topics(s.kafka, s.topics)
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    running = start(s, serve_http=True)
    running.serve_forever()
    yield running
    # Every thread that calls Ray ends before Ray does (a gauge set under ray.shutdown segfaults).
    stop_threads(running)
    from ray import serve

    serve.shutdown()
    ray.shutdown()
    os.environ.clear()
    os.environ.update(old)


def _crash_once(monkeypatch: pytest.MonkeyPatch, cls: type, method: str) -> dict[str, int]:
    """Make ``cls.method`` raise on its next call only; returns the call counter."""
    original: Callable[..., object] = getattr(cls, method)
    calls = {"n": 0}

    def patched(self: object, *args: object, **kwargs: object) -> object:
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError(f"injected crash in {cls.__name__}.{method}")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(cls, method, patched)
    return calls


def _wait_restart(running: Running, name: str, n: int = 1, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while running.supervisor.restarts[name] < n and time.time() < deadline:
        time.sleep(0.1)
    assert running.supervisor.restarts[name] == n, running.supervisor.errors
    assert running.supervisor.failure is None


def test_ingest_crash_is_restarted_and_ingest_goes_on(
    system: Running, monkeypatch: pytest.MonkeyPatch
) -> None:
    running = system
    first = running.ingestor
    calls = _crash_once(monkeypatch, Ingestor, "_should_flush")
    _wait_restart(running, "ingest")
    deadline = time.time() + 30
    while calls["n"] < 2 and time.time() < deadline:
        time.sleep(0.1)
    assert calls["n"] >= 2 and running.ingestor is not first  # a fresh member took over
    assert "injected crash in Ingestor._should_flush" in running.supervisor.errors["ingest"][0]
    replay(EVENTS, running.settings.kafka, running.settings.topics.events)
    deadline = time.time() + 60
    while running.buffer.stats().rows < len(EVENTS) and time.time() < deadline:
        time.sleep(0.2)
    assert running.buffer.stats().rows == len(EVENTS)  # exactly once across the restart


def test_loop_crash_is_restarted(system: Running, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _crash_once(monkeypatch, ContinualLoop, "should_train")
    _wait_restart(system, "loop")
    deadline = time.time() + 10
    while calls["n"] < 3 and time.time() < deadline:  # and it polls again
        time.sleep(0.1)
    assert calls["n"] >= 3 and system.supervisor.threads["loop"].is_alive()


def test_rollout_controller_crash_is_restarted(
    system: Running, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = _crash_once(monkeypatch, RolloutController, "step")
    _wait_restart(system, "rollout")
    deadline = time.time() + 10
    while calls["n"] < 3 and time.time() < deadline:
        time.sleep(0.1)
    assert calls["n"] >= 3 and system.supervisor.threads["rollout"].is_alive()


def test_killed_serving_context_is_recreated(system: Running) -> None:
    running = system
    old = running.context
    ray.get(old.snapshot.remote(), timeout=60)
    ray.kill(old, no_restart=True)
    _wait_restart(running, "history")
    deadline = time.time() + 60
    while running.context is old and time.time() < deadline:
        time.sleep(0.1)
    assert running.context is not old
    assert running.controller is not None and running.controller.context is running.context
    snap = ray.get(running.context.snapshot.remote(), timeout=60)
    users = set(running.buffer.read(columns=["user_id"]).column("user_id").to_pylist())
    # The history shards outlive the context (Ray restarts a shard on its own): the new context
    # finds them with every user's history.
    assert users and snap["history_users"] == len(users)


def test_restarts_are_in_the_metrics(system: Running) -> None:
    deadline = time.time() + 60
    while True:
        samples = scrape()
        counts = {c: value(samples, "ray_streamtune_component_restarts_total", component=c)
                  for c in ("ingest", "loop", "rollout", "history")}  # fmt: skip
        if all(n >= 1 for n in counts.values()):
            break
        assert time.time() < deadline, counts
        time.sleep(2)
    assert counts == {c: float(system.supervisor.restarts[c]) for c in counts}


# -- `up` gives up on a component that keeps dying -------------------------------------------

WRAPPER = """
import sys
from streams.ingest import Ingestor

def broken(self):
    raise RuntimeError("injected ingest failure")

Ingestor.run = broken
from services.cli import app
sys.argv = ["streamtune", "up", "--no-serve"]
app()
"""


def test_up_exits_non_zero_naming_the_component(kafka: KafkaConfig, tmp_path: Path) -> None:
    env = {
        **os.environ,
        **small_env(kafka, tmp_path / "state", free_port()),
        "STREAMTUNE_SUPERVISOR__MAX_RESTARTS": "2",
        "STREAMTUNE_SUPERVISOR__BACKOFF_S": "0.1",
        "COLUMNS": "200",
    }
    t0 = time.time()
    done = subprocess.run([sys.executable, "-c", WRAPPER], env=env, capture_output=True,
                          text=True, timeout=240, start_new_session=True)  # fmt: skip
    out = done.stdout + done.stderr
    assert done.returncode == 1, out[-3000:]
    assert "streamtune up failed: component 'ingest' failed 3 times" in out, out[-3000:]
    assert "RuntimeError: injected ingest failure" in out
    assert time.time() - t0 < 200
