"""Fault: the loop is killed while registering a version, after its upload, before its commit.

A child process registers versions in a real registry; the test side patches, inside that child
only, the create-only write of the registry's commit log (``LocalStorage.create`` on ``_log/``)
for the second version, so the child announces the moment (its files are uploaded, its log entry
is not written) and waits there, and then SIGKILLs it. The fault is proven on disk: the second
version's files and upload marker exist, and no version but the first is visible. The restart is
the loop's own start-up: a ``ContinualLoop`` over the same registry runs ``Registry.repair``.
Survived means: the registry is exactly what it was before the killed registration (one version,
its champion, one decision), a retried registration gets the next number with no gap and its
decision, and a repair past the grace period deletes the dead upload's files.

Scenarios (``quick`` runs the first): a promotion killed before its commit; a rejection killed
before its commit. (Registration, decision and champion move are one log entry, so there is no
later window to kill.)
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

# Runs in the child: registers v1, then stalls the commit of the next registration.
_CHILD = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    import numpy as np
    from safetensors.numpy import save_file
    from streams.storage import LocalStorage
    from training.registry import Registry

    root, promote, ready = Path(sys.argv[1]), sys.argv[2] == "1", sys.argv[3]

    def write(d):
        rng = np.random.default_rng(int(time.time_ns() % 1000))
        save_file({"w": rng.normal(size=(64, 16)).astype(np.float32)}, str(d / "model.safetensors"))
        (d / "vocab.json").write_text('{"v": 1, "items": []}')

    reg = Registry(root)
    v1 = reg.register(write, {"watermark": {"events:0": 100}}, promote=True, reason="first",
                      expect_latest=None)
    original = LocalStorage.create

    def create(self, key, data):
        if key.startswith("_log/"):
            Path(ready).write_text("uploaded, not committed")
            time.sleep(3600)  # SIGKILL arrives here
        return original(self, key, data)

    LocalStorage.create = create
    reg.register(write, {"watermark": {"events:0": 200}, "parent": v1}, promote=promote,
                 reason="gate says " + ("better" if promote else "worse"), expect_latest=v1)
    print("unreachable: the register completed", flush=True)
    """
)

SCENARIOS = [
    ("promotion killed before its commit", True),
    ("rejection killed before its commit", False),
]


def _files(root: Path) -> int:
    return sum(1 for p in (root / "versions").rglob("*") if p.is_file())


def _one(tmp: Path, name: str, promote: bool) -> dict[str, Any]:
    import numpy as np
    from safetensors.numpy import save_file

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
    cmd = [sys.executable, "-c", _CHILD, str(root), "1" if promote else "0", str(ready)]
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
    uploads = len(list((root / "uploads").iterdir()))
    # Two uploads on disk (v1's and the dead one's), one version visible.
    fault_happened = killed and uploads == 2 and reg.versions() == [1]

    t0 = time.monotonic()
    buffer = EventBuffer(BufferConfig(path=tmp / "buffer"))
    ContinualLoop(buffer, Registry(root), RoundConfig(), LoopConfig(), tmp / "loop.json")
    recover_s = time.monotonic() - t0

    after = Registry(root)
    versions_after = after.versions()
    untouched = (
        after.versions() == [1]
        and after.champion() == 1
        and [d["version"] for d in after.decisions()] == [1]
    )

    def write(d: Path) -> None:
        save_file({"w": np.ones((64, 16), np.float32)}, str(d / "model.safetensors"))
        (d / "vocab.json").write_text('{"v": 1, "items": []}')

    retried = after.register(write, {"watermark": {"events:0": 200}}, promote=promote,
                             reason="retried", expect_latest=1)  # fmt: skip
    files_before = _files(root)
    after.repair(older_than_s=0)  # past the grace period: the dead upload is garbage
    cleaned = _files(root) < files_before and len(list((root / "uploads").iterdir())) == 2
    final = Registry(root)
    consistent = (
        untouched
        and retried == 2
        and final.champion() == (2 if promote else 1)
        and [d["version"] for d in final.decisions()] == [1, 2]
        and cleaned
    )
    return {
        "scenario": name,
        "fault_happened": fault_happened,
        "versions_after_restart": versions_after,
        "retried_as": retried,
        "champion_after": final.champion(),
        "consistent": consistent,
        "duplicated": 0 if retried == 2 else 1,
        "lost": 0 if final.versions() == [1, 2] else 1,
        "recover_s": round(recover_s, 3),
    }


def fault_register_decision_kill(tmp: Path, quick: bool) -> dict[str, Any]:
    results = []
    for i, (name, promote) in enumerate(SCENARIOS[:1] if quick else SCENARIOS):
        results.append(_one(tmp / f"s{i}", name, promote))
    survived = all(r["fault_happened"] and r["consistent"] for r in results)
    detail = "; ".join(
        f"{r['scenario']}: after restart {r['versions_after_restart']}, retried as "
        f"v{r['retried_as']}, champion v{r['champion_after']}"
        + ("" if r["fault_happened"] else " (FAULT NOT INJECTED)")
        for r in results
    )
    return {
        "fault": "loop killed mid-registration",
        "survived": survived,
        "lost": sum(r["lost"] for r in results),
        "duplicated": sum(r["duplicated"] for r in results),
        "failed_requests": None,  # no serving in this fault: not measured
        "recover_s": max(r["recover_s"] for r in results),
        "detail": detail,
        "scenarios": results,
    }


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        print(json.dumps(fault_register_decision_kill(Path(d), "--quick" in sys.argv)))
