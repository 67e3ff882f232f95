"""The local servers the harness starts (S3, schema registry): stopping one, reading its log."""

from __future__ import annotations

import subprocess
from pathlib import Path
from types import TracebackType
from typing import Self

from services.descendants import stop_group


def log_tail(path: Path, lines: int = 30) -> str:
    """The last ``lines`` of a server's log, for an error message."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no log)"


class ServerProcess:
    """A server the harness starts as a process group of its own: ``start`` (the subclass's)
    sets ``proc``; ``stop`` ends the whole group; usable as a context manager."""

    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Self:
        raise NotImplementedError

    def stop(self) -> None:
        if self.proc is not None:
            stop_group(self.proc)
        self.proc = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
