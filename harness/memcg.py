"""A memory cgroup around a process tree: what a benchmark's processes hold, each page once, and
whether they fit under a cap.

Summed per-process RSS counts a shared page (torch's libraries, Ray's object store) once per
process that maps it; the kernel charges it to a cgroup once. A cap (``limit_bytes``) makes the
kernel reclaim the tree's page cache first and OOM-kill one of its processes only when what they
hold does not fit; ``oom_kills`` says whether that happened.

cgroup v1 (``memory.limit_in_bytes``, ``memory.max_usage_in_bytes``, ``memory.stat``'s
``total_*``) and v2 (``memory.max``, ``memory.peak``, ``memory.stat``) alike. Needs root, or a
delegated cgroup tree: ``available()`` says whether one can be made here.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

ROOT = Path("/sys/fs/cgroup")


def _parent() -> tuple[Path, bool] | None:
    """This process's memory cgroup directory and whether it is v2; None without one."""
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        hid, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(",") and (ROOT / "memory").is_dir():
            return ROOT / "memory" / path.lstrip("/"), False
        if hid == "0" and (ROOT / "cgroup.controllers").exists():
            return ROOT / path.lstrip("/"), True
    return None


def available() -> bool:
    """Whether a memory cgroup can be made under this process's own."""
    found = _parent()
    return found is not None and os.access(found[0], os.W_OK)


class MemoryCgroup:
    """A fresh memory cgroup under this process's own; ``enter`` from a child before it runs
    what is measured (``subprocess.Popen(preexec_fn=cg.enter)``): its descendants stay in it."""

    def __init__(self, name: str, limit_bytes: int | None = None) -> None:
        found = _parent()
        if found is None:
            raise RuntimeError("no memory cgroup controller here (/proc/self/cgroup)")
        parent, self.v2 = found
        self.path = parent / f"{name}-{uuid.uuid4().hex[:8]}"
        self.path.mkdir()
        self.limit_bytes = limit_bytes
        if limit_bytes is not None:
            self._write("memory.max" if self.v2 else "memory.limit_in_bytes", str(limit_bytes))

    def _read(self, name: str) -> str:
        return (self.path / name).read_text()

    def _write(self, name: str, value: str) -> None:
        (self.path / name).write_text(value)

    def enter(self) -> None:
        """Move the calling process into the cgroup."""
        self._write("cgroup.procs", str(os.getpid()))

    def stat(self) -> dict[str, int]:
        """``memory.stat``, hierarchical figures under v1 (``total_rss`` read as ``rss``)."""
        out: dict[str, int] = {}
        for line in self._read("memory.stat").splitlines():
            key, value = line.split()
            if self.v2:
                out[key] = int(value)
            elif key.startswith("total_"):
                out[key.removeprefix("total_")] = int(value)
        return out

    def resident(self) -> int:
        """Bytes the tree holds mapped, each page once: anonymous pages and mapped files (Ray's
        object store in ``/dev/shm`` included); not the unmapped page cache (written files) the
        cgroup is also charged for and reclaim drops first."""
        s = self.stat()
        return s["anon" if self.v2 else "rss"] + s["file_mapped" if self.v2 else "mapped_file"]

    def usage(self) -> int:
        """Everything charged now, page cache included."""
        return int(self._read("memory.current" if self.v2 else "memory.usage_in_bytes"))

    def peak(self) -> int:
        """The most ever charged at once, page cache included."""
        return int(self._read("memory.peak" if self.v2 else "memory.max_usage_in_bytes"))

    def oom_kills(self) -> int:
        """Processes the kernel killed because the tree did not fit under the cap."""
        text = self._read("memory.events" if self.v2 else "memory.oom_control")
        for line in text.splitlines():
            key, value = line.split()
            if key == "oom_kill":
                return int(value)
        return 0

    def remove(self) -> bool:
        """Remove the cgroup; False while processes are still in it (the kernel keeps it)."""
        try:
            self.path.rmdir()
        except OSError:
            return False
        return True
