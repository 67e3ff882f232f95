"""Fault: the loop is killed between registering a version and recording its decision.

A child process registers versions in a real registry; the test side patches, inside that child
only, the step that follows the version's rename (the champion move and the decision line) so
the child announces the moment and waits there, and then SIGKILLs it. The fault is proven on disk
(the version is visible, its decision line is missing). The restart is the loop's own start-up:
a ``ContinualLoop`` built over the same registry runs ``Registry.repair``. Survived means: one
decision line per version, matching the decision stored in the version's meta, the champion
consistent with it, and a second start-up writing nothing more.

Scenarios (``quick`` runs the first):
  * promote, killed after the rename and before the champion move;
  * promote, killed after the champion move and before the decision line;
  * reject, killed after the rename and before the decision line.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections import Counter
from pathlib import Path
from typing import Any

# Runs in the child. ``HOOK`` names the method that blocks: _apply_decision (right after the
# rename) or _append (after the champion moved, before the decision line is written).
_CHILD = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    import numpy as np
    from safetensors.numpy import save_file
    from training.registry import Registry

    root, hook, promote, ready = Path(sys.argv[1]), sys.argv[2], sys.argv[3] == "1", sys.argv[4]

    def write(d):
        rng = np.random.default_rng(len(list(d.parent.iterdir())))
        save_file({"w": rng.normal(size=(64, 16)).astype(np.float32)}, str(d / "model.safetensors"))
        (d / "vocab.json").write_text("[]")

    reg = Registry(root)
    v1 = reg.register(write, {"watermark": {"events:0": 100}}, promote=True, reason="first",
                      expect_latest=None)
    original = getattr(Registry, hook)

    def stall(self, *args, **kwargs):
        Path(ready).write_text("in the window")
        time.sleep(3600)  # SIGKILL arrives here

    if hook == "_apply_decision":
        Registry._apply_decision = stall
    else:
        def append(self, d):
            if d.version == v1:
                return original(self, d)
            stall(self)
        Registry._append = append
    reg.register(write, {"watermark": {"events:0": 200}, "parent": v1}, promote=promote,
                 reason="gate says " + ("better" if promote else "worse"), expect_latest=v1)
    print("unreachable: the register completed", flush=True)
    """
)

SCENARIOS = [
    ("promote, killed before the champion move", "_apply_decision", True),
    ("promote, killed before the decision line", "_append", True),
    ("reject, killed before the decision line", "_apply_decision", False),
]


def _one(tmp: Path, name: str, hook: str, promote: bool) -> dict[str, Any]:
    from services.config import LoopConfig
    from services.loop import ContinualLoop
    from streams.buffer import EventBuffer
    from streams.config import BufferConfig
    from training.registry import Registry
    from training.round import RoundConfig

    root, ready = tmp / "registry", tmp / "ready"
    root.mkdir(parents=True)
    repo = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": str(repo)}
    cmd = [sys.executable, "-c", _CHILD, str(root), hook, "1" if promote else "0", str(ready)]
    child = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not ready.exists():
        if child.poll() is not None or time.monotonic() > deadline:
            child.kill()
            _, err = child.communicate()
            raise RuntimeError(f"{name}: the child never reached the window: {err.decode()[-500:]}")
        time.sleep(0.02)
    os.kill(child.pid, signal.SIGKILL)
    child.wait(timeout=30)
    killed = child.returncode == -signal.SIGKILL

    reg = Registry(root)
    v2 = reg.latest()
    before = Counter(d["version"] for d in reg.decisions())
    fault_happened = killed and v2 == 2 and before[2] == 0
    champion_before = reg.champion()

    t0 = time.monotonic()
    buffer = EventBuffer(BufferConfig(path=tmp / "buffer"))
    ContinualLoop(buffer, Registry(root), RoundConfig(), LoopConfig(), tmp / "loop.json")
    recover_s = time.monotonic() - t0
    ContinualLoop(buffer, Registry(root), RoundConfig(), LoopConfig(), tmp / "loop.json")

    after = Registry(root)
    decisions = [d for d in after.decisions() if d["version"] == 2]
    meta = after.meta(2)
    want = "promote" if promote else "reject"
    consistent = (
        len(decisions) == 1
        and decisions[0]["decision"] == meta["decision"] == want
        and decisions[0]["repaired"] is True  # written by the restart, not by the dead child
        and after.champion() == (2 if promote else 1)
        and sorted(Counter(d["version"] for d in after.decisions()).values()) == [1, 1]
    )
    return {
        "scenario": name,
        "fault_happened": fault_happened,
        "champion_before_restart": champion_before,
        "champion_after": after.champion(),
        "decisions_for_v2": [d["decision"] for d in decisions],
        "consistent": consistent,
        "duplicated": max(0, len(decisions) - 1),
        "lost": 0 if 2 in after.versions() and decisions else 1,
        "recover_s": round(recover_s, 3),
    }


def fault_register_decision_kill(tmp: Path, quick: bool) -> dict[str, Any]:
    results = []
    for i, (name, hook, promote) in enumerate(SCENARIOS[:1] if quick else SCENARIOS):
        results.append(_one(tmp / f"s{i}", name, hook, promote))
    survived = all(r["fault_happened"] and r["consistent"] for r in results)
    detail = "; ".join(
        f"{r['scenario']}: champion {r['champion_before_restart']}->{r['champion_after']}, "
        f"v2 decisions {r['decisions_for_v2']}"
        + ("" if r["fault_happened"] else " (FAULT NOT INJECTED)")
        for r in results
    )
    return {
        "fault": "loop killed between register and decision",
        "survived": survived,
        "lost": sum(r["lost"] for r in results),
        "duplicated": sum(r["duplicated"] for r in results),
        "failed_requests": 0,
        "recover_s": max(r["recover_s"] for r in results),
        "detail": detail,
        "scenarios": results,
    }


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        print(json.dumps(fault_register_decision_kill(Path(d), "--quick" in sys.argv)))
