"""The loop's thread yields the CPU to requests: its rounds run at ``loop.nice`` with torch on
that thread alone, while the rest of the process (ingest, the rollout controller) keeps its
priority. In a subprocess: torch's thread count is process-wide."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path


def _run(tmp_path: Path, nice: int) -> dict[str, int]:
    code = textwrap.dedent(f"""
        import json, os, threading
        import torch
        from services.config import LoopConfig
        from services.loop import ContinualLoop
        from streams.buffer import EventBuffer
        from streams.config import BufferConfig
        from training.registry import Registry
        from training.round import RoundConfig

        root = {str(tmp_path)!r}
        torch.set_num_threads(2)
        loop = ContinualLoop(EventBuffer(BufferConfig(path=root + "/buffer")),
                             Registry(root + "/registry"), RoundConfig(),
                             LoopConfig(nice={nice}, poll_s=0.05), root + "/loop.json")
        seen = {{}}
        stop = threading.Event()

        def should_train():  # the loop's own thread, at its first check: what it runs at
            tid = threading.get_native_id()
            seen.update(thread=os.getpriority(os.PRIO_PROCESS, tid),
                        torch_threads=torch.get_num_threads())
            stop.set()
            return False

        loop.should_train = should_train
        t = threading.Thread(target=loop.run, args=(stop,))
        t.start()
        t.join(30)
        seen["main"] = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
        print(json.dumps(seen))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, check=True)  # fmt: skip
    got: dict[str, int] = json.loads(out.stdout.strip().splitlines()[-1])
    return got


def test_the_loop_thread_runs_at_loop_nice_and_the_rest_of_the_process_does_not(
    tmp_path: Path,
) -> None:
    base = os.getpriority(os.PRIO_PROCESS, 0)  # what the subprocess starts with
    got = _run(tmp_path, nice=15)
    assert got["thread"] == max(15, base) and got["torch_threads"] == 1
    assert got["main"] == base  # ingest and the controller, in other threads, keep their priority


def test_nice_zero_leaves_the_thread_and_torch_alone(tmp_path: Path) -> None:
    got = _run(tmp_path, nice=0)
    assert got["thread"] == os.getpriority(os.PRIO_PROCESS, 0) and got["torch_threads"] == 2
