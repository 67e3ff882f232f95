"""Where the continual loop keeps its record (``rounds`` and ``totals``) and how it is read.

The loop (``services.loop``) is its one writer; `status`, the demo and the benchmarks read it from
other processes. Kept apart from the loop so that a reader need not import the trainer.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

STATE_FILE = "loop.json"  # in the state directory


def read_state(path: Path) -> dict[str, Any]:
    """The loop's record as its state file holds it (empty before its first round)."""
    try:
        data: dict[str, Any] = json.loads(path.read_text())
        return data
    except FileNotFoundError:
        return {"rounds": [], "totals": {}}
