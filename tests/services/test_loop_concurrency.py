"""Two writers, one slice: a round registers only if nobody registered since it read its data.

* Two processes do what ``ContinualLoop.run_once`` does around the round (read the latest
  version, take the slice after its watermark, register through ``Registry.expecting``) at the
  same moment: exactly one registers.
* A real loop round (real Ray Train + DeepSpeed) during which another process registers the same
  slice: the round is dropped (not registered, no decision line) and the next round finds
  nothing new to train on.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors.numpy import save_file

from training.errors import ConcurrentRoundError
from training.registry import Registry


def _write(d: Path) -> None:
    save_file({"w": np.ones((4, 3), np.float32)}, str(d / "model.safetensors"))


def _loop_like(root: str, slice_end: int, barrier: Any, out: Any, i: int) -> None:
    reg = Registry(Path(root))
    base = reg.latest()
    after = reg.meta(base)["watermark"] if base is not None else {}
    barrier.wait()  # both "rounds" trained on the same slice; now both try to register it
    meta = {"watermark": {"events:0": slice_end}, "after_watermark": after, "who": i}
    try:
        v = reg.expecting(base).register(_write, meta, promote=True, reason=f"round {i}",
                                         expect_latest=base)  # fmt: skip
        out.put((i, "registered", v))
    except ConcurrentRoundError:
        out.put((i, "dropped", None))


def test_two_loops_racing_register_the_slice_once(tmp_path: Path) -> None:
    reg = Registry(tmp_path / "reg")
    v1 = reg.register(_write, {"watermark": {"events:0": 500}}, promote=True, reason="first",
                      expect_latest=None)  # fmt: skip
    ctx = mp.get_context("spawn")
    barrier, out = ctx.Barrier(2), ctx.Queue()
    procs = [
        ctx.Process(target=_loop_like, args=(str(reg.root), 900, barrier, out, i)) for i in range(2)
    ]
    for p in procs:
        p.start()
    results = sorted(out.get(timeout=120)[1] for _ in procs)
    for p in procs:
        p.join(timeout=30)
    assert results == ["dropped", "registered"]
    assert reg.versions() == [v1, 2]
    slices = [
        (reg.meta(v).get("after_watermark"), reg.meta(v)["watermark"]) for v in reg.versions()
    ]
    assert slices[1] == ({"events:0": 500}, {"events:0": 900})
    assert [d["version"] for d in reg.decisions()] == [v1, 2]


def test_pinned_view_refuses_a_round_built_on_a_newer_version(tmp_path: Path) -> None:
    """The loop read its slice after v1; if the round inside read v2 (registered meanwhile) as its
    base, registering on top of v2 would skip or repeat data: refused."""
    reg = Registry(tmp_path / "reg")
    v1 = reg.register(_write, {}, promote=True, reason="a", expect_latest=None)
    pinned = reg.expecting(v1)
    v2 = reg.register(_write, {}, promote=False, reason="other process", expect_latest=v1)
    with pytest.raises(ConcurrentRoundError, match="read after version 1"):
        pinned.register(_write, {}, promote=True, reason="late", expect_latest=v2)
    with pytest.raises(ConcurrentRoundError):
        pinned.register(_write, {}, promote=True, reason="late", expect_latest=v1)
    assert reg.versions() == [v1, v2]


# -- a real round racing another process ------------------------------------------------------
_OTHER = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    import numpy as np
    from safetensors.numpy import save_file
    from training.registry import Registry

    root, watermark = Path(sys.argv[1]), json.loads(sys.argv[2])
    def write(d):
        save_file({"w": np.ones((4, 3), np.float32)}, str(d / "model.safetensors"))
    v = Registry(root).register(write, {"watermark": watermark, "who": "other process"},
                                promote=True, reason="other process round", expect_latest=None)
    print(v)
    """
)


@pytest.fixture
def ray_local() -> Iterator[None]:
    import ray

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.mark.integration
@pytest.mark.slow
def test_real_round_loses_the_race_and_is_not_registered(tmp_path: Path, ray_local: None) -> None:
    import threading
    import time

    from harness.faults_training import train_worker_pids
    from harness.rounds import small_round
    from services.config import LoopConfig
    from services.loop import ContinualLoop
    from streams.buffer import EventBuffer
    from streams.config import BufferConfig
    from streams.offsets import OffsetRange
    from tests.training.data_gen import synthetic_table

    table = synthetic_table(800, seed=5)
    buffer = EventBuffer(BufferConfig(path=tmp_path / "buffer"))
    buffer.append(table, [OffsetRange("events", 0, 0, table.num_rows)])
    reg = Registry(tmp_path / "registry")
    # Enough epochs that the round is still training when the other process has registered.
    loop = ContinualLoop(buffer, reg, small_round(tmp_path / "ray", epochs=25, max_failures=0),
                         LoopConfig(min_round_events=100, long_lived_trainer=False),
                         tmp_path / "loop.json")  # fmt: skip
    out: dict[str, Any] = {}
    runner = threading.Thread(target=lambda: out.update(result=loop.run_once()))
    runner.start()
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:  # the round's Ray Train workers are up: it is training
        if train_worker_pids():
            break
        time.sleep(0.3)
    other = subprocess.run(
        [sys.executable, "-c", _OTHER, str(reg.root), json.dumps(buffer.watermark())],
        capture_output=True, text=True, timeout=300, check=True,
    )  # fmt: skip
    runner.join(timeout=600)
    assert other.stdout.strip() == "1"  # the other process registered first ...
    assert loop.state()["rounds"] == []  # ... while this round trained,
    assert out["result"] is None and "another process" in str(loop.last_skip)  # so it was dropped
    assert reg.versions() == [1] and reg.meta(1)["who"] == "other process"
    assert [d["version"] for d in reg.decisions()] == [1]  # ... and recorded nothing
    assert loop.pending() == 0 and loop.run_once() is None  # the slice is not trained again


@pytest.mark.integration
@pytest.mark.slow
def test_two_real_train_once_runs_register_the_slice_once(tmp_path: Path) -> None:
    """Two `streamtune train --once` processes over one state dir, started together: each starts
    its own Ray and trains; whichever registers second is dropped (or, if it started after the
    first had registered, finds nothing new). Never two versions for one slice."""
    from streams.buffer import EventBuffer
    from streams.config import BufferConfig
    from streams.offsets import OffsetRange
    from tests.training.data_gen import synthetic_table

    state = tmp_path / "state"
    table = synthetic_table(800, seed=6)
    EventBuffer(BufferConfig(path=state / "buffer")).append(
        table, [OffsetRange("events", 0, 0, table.num_rows)]
    )
    env = {
        **os.environ,
        "STREAMTUNE_STATE_DIR": str(state),
        "STREAMTUNE_EMBEDDED_BROKER": "false",
        "STREAMTUNE_MODEL__MAX_LEN": "20",
        "STREAMTUNE_MODEL__D_MODEL": "32",
        "STREAMTUNE_TRAINER__NUM_WORKERS": "1",
        "STREAMTUNE_TRAINER__EPOCHS": "1",
        "STREAMTUNE_TRAINER__FIRST_ROUND_EPOCHS": "1",
        "STREAMTUNE_TRAINER__BATCH_SIZE": "64",
        "STREAMTUNE_GATE__MIN_EVAL_USERS": "5",
        "STREAMTUNE_LOOP__MIN_ROUND_EVENTS": "100",
    }
    cmd = [sys.executable, "-m", "services.cli", "train", "--once"]
    procs = [
        subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=900)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[-2000:] for o in outs]
    reg = Registry(state / "registry")
    assert reg.versions() == [1], outs
    assert [d["version"] for d in reg.decisions()] == [1]
    registered = [o for o in outs if '"version": 1' in o]
    assert len(registered) == 1, [o[-2000:] for o in outs]


def test_a_round_too_small_to_gate_is_skipped_and_its_events_wait(tmp_path: Path) -> None:
    """No Ray: the round is refused before training. Nothing is registered, the trained watermark
    stays, and the loop asks again only once min_round_events more have arrived."""
    from harness.rounds import small_round
    from services.config import LoopConfig
    from services.loop import ContinualLoop
    from streams.buffer import EventBuffer
    from streams.config import BufferConfig
    from streams.offsets import OffsetRange
    from tests.training.data_gen import synthetic_table
    from training.config import GateConfig

    table = synthetic_table(800, seed=5)
    buffer = EventBuffer(BufferConfig(path=tmp_path / "buffer"))
    buffer.append(table.slice(0, 400), [OffsetRange("events", 0, 0, 400)])
    cfg = small_round(tmp_path / "ray", epochs=1, max_failures=0)
    cfg = cfg.model_copy(update={"gate": GateConfig(min_eval_users=10**6)})
    loop = ContinualLoop(buffer, Registry(tmp_path / "registry"), cfg,
                         LoopConfig(min_round_events=100, first_round_events=100),
                         tmp_path / "loop.json")  # fmt: skip
    assert loop.should_train()
    assert loop.run_once() is None and "too few to gate" in str(loop.last_skip)
    assert loop.registry.versions() == [] and loop.pending() == 400  # the events still wait
    assert not loop.should_train()  # not again at once: for 100 more events
    buffer.append(table.slice(400, 100), [OffsetRange("events", 0, 400, 500)])
    assert loop.should_train() and loop.pending() == 500


def test_a_quiet_streams_small_tail_is_trained_once_it_waited_max_pending_s(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No Ray: fewer than min_round_events pending is no round, until they have waited
    max_pending_s (first_round_wait_s: no champion yet); then the round takes them, below
    min_round_events included."""
    import time

    from harness.rounds import small_round
    from services import loop as loop_mod
    from services.config import LoopConfig
    from services.loop import ContinualLoop
    from streams.buffer import EventBuffer
    from streams.config import BufferConfig
    from streams.offsets import OffsetRange
    from tests.training.data_gen import synthetic_table

    table = synthetic_table(100, seed=5)
    buffer = EventBuffer(BufferConfig(path=tmp_path / "buffer"))
    buffer.append(table.slice(0, 60), [OffsetRange("events", 0, 0, 60)])
    cfg = small_round(tmp_path / "ray", epochs=1, max_failures=0)
    loop = ContinualLoop(buffer, Registry(tmp_path / "registry"), cfg,
                         LoopConfig(min_round_events=100, first_round_events=100,
                                    max_pending_s=0.5, first_round_wait_s=0.5),
                         tmp_path / "loop.json")  # fmt: skip
    planned: list[int] = []

    def run_planned(plan: Any, *args: Any) -> Any:  # what the round would get: stop there
        planned.append(plan.min_events)
        raise ConcurrentRoundError("stop here")

    monkeypatch.setattr(loop_mod, "run_planned", run_planned)
    assert not loop.should_train()  # 60 < 100, just seen
    time.sleep(0.1)
    assert not loop.should_train()  # still too few, not waited long enough
    time.sleep(0.5)
    assert loop.should_train()  # waited max_pending_s: due, small as it is
    loop.run_once()
    assert planned == [1]  # the round does not refuse them for being under min_round_events
    buffer.append(table.slice(60, 40), [OffsetRange("events", 0, 60, 100)])
    time.sleep(0.02)
    assert loop.should_train()  # 100 pending: the usual trigger, no wait
    loop.run_once()
    assert planned == [1, 100]


def test_rounds_are_capped_and_the_first_version_waits_for_enough_events(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No Ray: a warm round takes at most max_round_events (oldest first, shared across
    partitions), the rest waits for the next; with no champion the round waits for
    first_round_events and then takes everything."""
    from services import loop as loop_mod
    from services.config import LoopConfig
    from services.loop import ContinualLoop, cap_round
    from streams.buffer import EventBuffer
    from streams.config import BufferConfig
    from streams.offsets import OffsetRange
    from tests.training.data_gen import synthetic_table

    assert cap_round({"a": 10}, {"a": 30, "b": 20}, 100) == {"a": 30, "b": 20}
    assert cap_round({"a": 10}, {"a": 30, "b": 20}, 20) == {"a": 20, "b": 10}
    assert cap_round({}, {"a": 0, "b": 40}, 10) == {"a": 0, "b": 10}

    table = synthetic_table(600, seed=5)
    buffer = EventBuffer(BufferConfig(path=tmp_path / "buffer"))
    buffer.append(table.slice(0, 300), [OffsetRange("events", 0, 0, 300)])
    loop = ContinualLoop(buffer, Registry(tmp_path / "registry"), _cfg(tmp_path),
                         LoopConfig(min_round_events=50, max_round_events=100,
                                    first_round_events=500, max_pending_s=60),
                         tmp_path / "loop.json")  # fmt: skip
    planned: list[dict[str, int]] = []

    def run_planned(plan: Any, *args: Any) -> Any:  # what the round would get: stop there
        planned.append(plan.upto)
        raise ConcurrentRoundError("stop here")

    monkeypatch.setattr(loop_mod, "run_planned", run_planned)
    assert not loop.should_train()  # no champion: 300 < first_round_events
    buffer.append(table.slice(300, 300), [OffsetRange("events", 0, 300, 600)])
    assert loop.should_train()
    loop.run_once()
    assert planned == [{"events:0": 600}]  # a fresh start is not capped
    _fake_champion(loop.registry, {"events:0": 200})
    assert loop.should_train()  # 400 pending >= min_round_events
    loop.run_once()
    assert planned[-1] == {"events:0": 300}  # 100 of the 400 pending


def _cfg(tmp: Path) -> Any:
    from harness.rounds import small_round

    return small_round(tmp / "ray", epochs=1, max_failures=0)


def _fake_champion(reg: Registry, watermark: dict[str, int]) -> None:
    reg.register(_write, {"watermark": watermark}, promote=True, reason="test champion",
                 expect_latest=reg.latest())  # fmt: skip


def test_a_rejected_last_round_is_retrained_alone_once_the_stream_is_quiet(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No Ray: nothing pending, but the latest version was rejected with events in its carry.
    After max_pending_s the loop runs a round with no new events (min_events 0), a few times at
    most; a rejected round without carried events asks for nothing."""
    import time

    from services import loop as loop_mod
    from services.config import LoopConfig
    from services.loop import CARRY_TRIES, ContinualLoop
    from streams.buffer import EventBuffer
    from streams.config import BufferConfig

    reg = Registry(tmp_path / "registry")
    _fake_champion(reg, {})
    reg.register(_write, {"watermark": {}, "carry_events": 120}, promote=False,
                 reason="rejected", expect_latest=1)  # fmt: skip
    loop = ContinualLoop(EventBuffer(BufferConfig(path=tmp_path / "buffer")), reg, _cfg(tmp_path),
                         LoopConfig(max_pending_s=0.2), tmp_path / "loop.json")  # fmt: skip
    planned: list[int] = []

    def run_planned(plan: Any, *args: Any) -> Any:
        planned.append(plan.min_events)
        raise ConcurrentRoundError("stop here")

    monkeypatch.setattr(loop_mod, "run_planned", run_planned)
    assert not loop.should_train()  # not quiet long enough yet
    assert loop.carry_waiting()  # so a stream's end is not trained yet (the demo waits)
    for _ in range(CARRY_TRIES):
        time.sleep(0.25)
        assert loop.should_train()
        loop.run_once()
    time.sleep(0.25)
    assert planned == [0] * CARRY_TRIES and not loop.should_train()  # gave up: wait for events
    assert not loop.carry_waiting()
    reg.register(_write, {"watermark": {}, "carry_events": 0}, promote=False, reason="rejected",
                 expect_latest=2)  # fmt: skip
    loop.carry_tries = 0
    time.sleep(0.25)
    assert not loop.should_train()  # nothing carried: nothing to do
    assert not loop.carry_waiting()
