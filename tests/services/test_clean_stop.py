"""Ctrl-C / SIGTERM of `streamtune up` and `demo --keep` mid-round stops everything within 30 s.

Each case starts the real thing in its own process group (embedded Kafka broker, local Ray, Serve),
waits until a training round is under way (Ray Train's run directory appears), records every
process it started (the Java broker, gcs/raylet, Ray workers, Train workers), signals it, and then
checks that it exited in time, that none of those processes is left and the broker port is closed.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from services.config import SupervisorConfig
from streams.broker import free_port
from streams.config import KafkaConfig
from streams.datasets import DriftSpec, synthetic_drift
from streams.producer import replay
from training.registry import Registry

pytestmark = [pytest.mark.integration, pytest.mark.slow]

# The stop's own budget: a stop that outruns it fails.
STOP_S = SupervisorConfig().stop_timeout_s


def _env(state: Path, broker_port: int) -> dict[str, str]:
    return {
        **os.environ,
        "STREAMTUNE_STATE_DIR": str(state),
        "STREAMTUNE_EMBEDDED_BROKER": "true",
        "STREAMTUNE_BROKER__PORT": str(broker_port),
        "STREAMTUNE_BROKER__CONTROLLER_PORT": str(free_port()),
        "STREAMTUNE_BROKER__HEAP": "384m",
        "STREAMTUNE_SERVING__PORT": str(free_port()),
        "STREAMTUNE_SERVING__REPLICAS": "1",
        "STREAMTUNE_MODEL__MAX_LEN": "20",
        "STREAMTUNE_MODEL__D_MODEL": "32",
        "STREAMTUNE_MODEL__TEXT_INIT": "false",
        # Long enough that the signal surely lands while the workers train.
        "STREAMTUNE_TRAINER__EPOCHS": "200",
        "STREAMTUNE_TRAINER__FIRST_ROUND_EPOCHS": "200",
        "STREAMTUNE_LOOP__FIRST_ROUND_EVENTS": "1000",
        "STREAMTUNE_LOOP__MIN_ROUND_EVENTS": "300",
        "STREAMTUNE_LOOP__POLL_S": "0.5",
        "STREAMTUNE_INGEST__FLUSH_INTERVAL_S": "0.3",
        "COLUMNS": "200",
    }


def _wait_for(
    cond: object, timeout: float, what: str, proc: subprocess.Popen[bytes], log: Path
) -> None:
    deadline = time.time() + timeout
    while not cond():  # type: ignore[operator]
        if proc.poll() is not None:
            pytest.fail(
                f"exited early ({proc.returncode}) waiting for {what}:\n{log.read_text()[-3000:]}"
            )
        if time.time() > deadline:
            pytest.fail(f"timed out waiting for {what}:\n{log.read_text()[-3000:]}")
        time.sleep(0.3)


def _alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0):
            return True
    except OSError:
        return False


def _request_path_outranks_training(started: list[psutil.Process]) -> None:
    """The Ray that `up` starts runs its workers at serving.worker_niceness (0; the history shards
    here, Serve replicas once a version exists) and training workers at trainer.nice (19), not
    all at Ray's default 15."""
    titles: dict[int, str] = {}
    for p in started:
        try:
            titles[p.pid] = " ".join(p.cmdline())
        except psutil.Error:
            continue
    shards = [p for p in started if titles.get(p.pid, "").startswith("ray::HistoryShard")]
    trainers = [p for p in started if titles.get(p.pid, "").startswith("ray::RayTrainWorker")]
    assert shards and trainers, sorted(titles.values())
    assert {p.nice() for p in shards} == {0}
    # Niceness is per thread on Linux: the training thread sets its own, and the torch threads it
    # starts inherit it. Over a second of the round, nearly all of a worker's CPU is theirs.
    before = {p.pid: _thread_cpu(p) for p in trainers}
    time.sleep(1.0)
    for p in trainers:
        spent: dict[int, float] = {}
        for tid, cpu in _thread_cpu(p).items():
            spent[tid] = cpu - before[p.pid].get(tid, 0.0)
        total = sum(spent.values())
        niced = sum(v for tid, v in spent.items() if _thread_nice(tid) == 19)
        assert total > 0.1 and niced >= 0.8 * total, (p.pid, total, niced)


def _thread_cpu(p: psutil.Process) -> dict[int, float]:
    return {t.id: t.user_time + t.system_time for t in p.threads()}


def _thread_nice(tid: int) -> int | None:
    try:
        return os.getpriority(os.PRIO_PROCESS, tid)
    except OSError:  # the thread ended meanwhile
        return None


@pytest.mark.parametrize(
    ("command", "sig", "to_group"),
    [
        ("up", signal.SIGTERM, False),  # `kill PID` / `streamtune down`
        # Ctrl-C in a terminal: SIGINT to the whole foreground group, every child included
        # (`up` takes SIGINT through the same handler and shutdown as SIGTERM).
        ("demo", signal.SIGINT, True),
    ],
    ids=["up-sigterm", "demo-keep-ctrl-c"],
)
def test_signal_mid_round_stops_everything(
    command: str, sig: signal.Signals, to_group: bool, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    broker_port = free_port()
    env = _env(state, broker_port)
    if command == "up":
        args = ["up"]
    else:
        args = ["demo", "--keep", "--events", "6000", "--first-round-events", "3000",
                "--slice-events", "1000", "--rate", "3000", "--query-rps", "2",
                "--out", str(tmp_path / "out")]  # fmt: skip
    log = tmp_path / "cli.log"
    with log.open("wb") as out:
        cmd = [sys.executable, "-m", "services.cli", *args]
        proc = subprocess.Popen(
            cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        if command == "up":
            _wait_for(lambda: "streamtune up:" in log.read_text(), 240, "up to start", proc, log)
            kafka = KafkaConfig(bootstrap_servers=f"127.0.0.1:{broker_port}")
            events = synthetic_drift(DriftSpec(users=40, events=3000, seed=3))
            replay(list(events), kafka, "streamtune.events")
        # Mid-round: after the first epoch's checkpoint, with epochs still to go. (Not earlier:
        # a fresh environment's first round JIT-builds a DeepSpeed op, and a kill during that
        # build leaves partial build files behind for every later test's rounds.)
        ckpts = lambda: list(state.rglob("ray_results/*/checkpoint_*"))  # noqa: E731
        _wait_for(lambda: bool(ckpts()), 420, "a training round's first epoch", proc, log)
        assert proc.poll() is None
        started = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
        broker_pid = int(next(state.rglob("kafka/broker.pid")).read_text())
        names = {p.pid: p.name() for p in started if _alive(p)}
        assert broker_pid in names and "java" in names[broker_pid]
        assert any("raylet" in n for n in names.values()), names
        assert any("gcs_server" in n for n in names.values()), names
        assert _port_open(broker_port)
        _request_path_outranks_training(started)
        t0 = time.monotonic()
        if to_group:
            os.killpg(proc.pid, sig)
        else:
            os.kill(proc.pid, sig)
        try:
            rc = proc.wait(timeout=STOP_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f"still running {STOP_S}s after {sig.name}:\n{log.read_text()[-3000:]}")
        took = time.monotonic() - t0
        _, alive = psutil.wait_procs(started, timeout=max(0.5, STOP_S - took))
        left = [f"{p.pid} {names.get(p.pid)}" for p in alive if _alive(p)]
        tail = log.read_text()[-3000:]
        assert not left, f"left behind {took:.1f}s after {sig.name}: {left}\n{tail}"
        assert not _port_open(broker_port), "the broker port is still open"
        text = log.read_text()
        assert rc in (0, 130), text[-3000:]
        if command == "up":
            assert "stopped (signal" in text and "not clean" not in text, text[-2000:]
        # Ray's core was up until the ordered stop reached it (not killed with the demo's work
        # thread, which ends first), so the stop did not have to clear its orphans.
        assert "Ray's orphans" not in text, text[-3000:]
        # The round in flight ended with the training run the stop closed, not as a failure: no
        # error of the run's controller killed under it, no failed round.
        assert "ActorDiedError" not in text and "round failed" not in text, text[-3000:]
        # Nothing partial was registered: every version there is loads.
        for reg_dir in state.rglob("registry"):
            reg = Registry(reg_dir)
            for v in reg.versions():
                reg.load(v)
        print(f"{command} {sig.name}: exited {rc} in {took:.1f}s")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        for p in psutil.process_iter():  # never leave a broker of this test behind
            try:
                if str(state) in " ".join(p.cmdline()):
                    p.kill()
            except psutil.Error:
                pass
