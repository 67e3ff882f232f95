"""The whole loop on one machine: Kafka -> ingest -> rounds -> registry -> Serve, plus a kill."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

from services.cli import app
from services.runtime import Running
from streams.broker import free_port
from streams.config import KafkaConfig
from streams.datasets import DriftSpec, synthetic_drift
from streams.producer import replay
from tests.services.live_loop import running_loop, small_env

pytestmark = [pytest.mark.integration, pytest.mark.slow]

EVENTS = list(synthetic_drift(DriftSpec(users=60, events=7000, seed=21, items_per_topic=25,
                                        topics=6, new_item_every=150)))  # fmt: skip


def settings_env(kafka: KafkaConfig, state: Path, port: int) -> dict[str, str]:
    """``small_env`` with rounds that learn enough for the gate to promote: three epochs, the
    recipe's learning rate, the gate's tolerance, titles' text initialisation on."""
    env = small_env(kafka, state, port, topics="loop")
    del env["STREAMTUNE_MODEL__TEXT_INIT"]
    for key in ("STREAMTUNE_SUPERVISOR__GAUGES_EVERY_S", "STREAMTUNE_SUPERVISOR__BACKOFF_S"):
        del env[key]
    return env | {
        "STREAMTUNE_TRAINER__EPOCHS": "3",
        "STREAMTUNE_TRAINER__FIRST_ROUND_EPOCHS": "3",
        "STREAMTUNE_TRAINER__LR": "0.005",
        "STREAMTUNE_GATE__TOLERANCE": "0.05",
    }


@pytest.fixture(scope="module")
def system(
    kafka: KafkaConfig, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Running, dict[str, str]]]:
    state = tmp_path_factory.mktemp("loopstate")
    env = settings_env(kafka, state, free_port())
    with running_loop(env) as running:
        yield running, env


def produce_and_wait(running: Running, events: list, total: int) -> None:
    replay(events, running.settings.kafka, running.settings.topics.events)
    deadline = time.time() + 60
    while running.buffer.stats().rows < total and time.time() < deadline:
        time.sleep(0.2)
    assert running.buffer.stats().rows == total


def test_loop_promotes_versions_and_serve_follows(system: tuple[Running, dict[str, str]]) -> None:
    running, env = system
    assert running.controller is not None
    produce_and_wait(running, EVENTS[:3000], 3000)
    r1 = running.loop.run_once()
    assert r1 is not None and r1.promoted, r1
    running.controller.step()
    produce_and_wait(running, EVENTS[3000:5000], 5000)
    r2 = running.loop.run_once()
    assert r2 is not None and r2.promoted, r2
    running.controller.step()
    url = f"http://127.0.0.1:{running.settings.serving.port}"
    rec = httpx.post(f"{url}/recommend", json={"user_id": "u1", "k": 5}).json()
    assert rec["version"] == r2.version == running.registry.champion()
    assert rec["source"] == "history"  # u1's live history came from Kafka
    # The loop's watermarks chain: round 2 started exactly where round 1 ended.
    m1, m2 = running.registry.meta(r1.version), running.registry.meta(r2.version)
    assert m2["after_watermark"] == m1["watermark"]
    assert sum(m2["watermark"].values()) == 5000
    result = CliRunner().invoke(app, ["status"], env=env)
    assert result.exit_code == 0, result.output
    assert f"champion {r2.version}" in result.output and "promote" in result.output
    # --watch draws the same page, then again after each pause (here: Ctrl-C on the second).
    import services.cli_loop as cli_loop

    frames: list[int] = []
    real = cli_loop.show_status

    def once_then_interrupt(settings: Any, console: Any) -> None:
        frames.append(1)
        if len(frames) > 1:
            raise KeyboardInterrupt
        real(settings, console)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cli_loop, "show_status", once_then_interrupt)
        watched = CliRunner().invoke(app, ["status", "--watch", "0.5"], env=env)
    assert watched.exit_code == 0 and len(frames) == 2, watched.output
    assert f"champion {r2.version}" in watched.output and "every 0.5s" in watched.output
    evaluated = CliRunner().invoke(app, ["eval", "--last", "1000"], env=env)
    assert evaluated.exit_code == 0, evaluated.output
    assert f"v{r2.version} on the newest" in evaluated.output and "NDCG@10" in evaluated.output


def test_loop_killed_mid_round_resumes_without_skipping(
    system: tuple[Running, dict[str, str]], tmp_path: Path
) -> None:
    running, env = system
    before = running.registry.versions()
    champion = running.registry.champion()
    trained = running.loop.trained_watermark()
    produce_and_wait(running, EVENTS[5000:7000], 7000)
    cmd = [sys.executable, "-m", "services.cli", "train", "--once"]
    full_env = {**os.environ, **env}
    log = (tmp_path / "train.log").open("wb")
    proc = subprocess.Popen(cmd, env=full_env, stdout=log, stderr=log, start_new_session=True)
    # Kill once Ray Train is under way (its run directory appears), i.e. mid-round.
    runs = Path(env["STREAMTUNE_STATE_DIR"]) / "ray_results"
    deadline = time.time() + 120
    seen = {p.name for p in runs.glob("round-*")} if runs.exists() else set()
    while time.time() < deadline:
        now = {p.name for p in runs.glob("round-*")} if runs.exists() else set()
        if now - seen:
            break
        time.sleep(0.2)
    time.sleep(3.0)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert running.registry.versions() == before  # nothing partial was registered
    assert running.registry.champion() == champion
    running.registry.load(champion)  # and the champion is intact
    done = subprocess.run(cmd, env=full_env, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stdout + done.stderr
    new = running.registry.latest()
    assert new == before[-1] + 1
    meta = running.registry.meta(new)
    assert meta["after_watermark"] == trained  # no data skipped
    assert sum(meta["watermark"].values()) == 7000  # and none left behind
    assert meta["new_events"] == 2000  # nor trained twice
