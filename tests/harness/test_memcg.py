"""The memory cgroup ``bench.scale --part up`` measures ``up`` in: it sees what a process tree
holds, and a cap it does not fit under kills it."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from harness.memcg import MemoryCgroup, available

pytestmark = pytest.mark.skipif(
    not available(), reason="needs a writable memory cgroup (root, or a delegated cgroup tree)"
)

MIB = 1 << 20
# A child that holds 300 MiB of written pages, then reports how much its cgroup holds.
HOLD = "b = bytearray(300 * 2**20); b[::4096] = b'x' * len(b[::4096]); input()"


def test_a_process_trees_memory_is_charged_once_and_seen() -> None:
    cg = MemoryCgroup("st-test")
    try:
        child = subprocess.Popen([sys.executable, "-c", HOLD], stdin=subprocess.PIPE,
                                 preexec_fn=cg.enter)  # fmt: skip
        try:
            deadline = time.monotonic() + 30
            while cg.resident() < 300 * MIB and time.monotonic() < deadline:
                time.sleep(0.05)  # until the child has written its pages
            # the child's pages and its interpreter's, not this test's process (outside the cgroup)
            assert 300 * MIB <= cg.resident() < 400 * MIB
            assert cg.peak() >= cg.resident() and cg.oom_kills() == 0
        finally:
            child.communicate(b"\n", timeout=30)
    finally:
        assert cg.remove()


def test_a_tree_over_its_cap_is_killed_and_counted() -> None:
    cg = MemoryCgroup("st-test", limit_bytes=150 * MIB)
    try:
        child = subprocess.run([sys.executable, "-c", HOLD], input=b"\n", preexec_fn=cg.enter,
                               timeout=60)  # fmt: skip
        assert child.returncode == -9  # SIGKILL from the kernel's OOM killer
        assert cg.oom_kills() >= 1 and cg.peak() <= 150 * MIB
    finally:
        assert cg.remove()
