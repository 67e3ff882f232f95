"""What the offline and streaming parts of ``bench.quality`` share: progress lines on stderr and
the mean ± standard deviation over seeds."""

from __future__ import annotations

import time

import numpy as np
from rich.console import Console

err = Console(stderr=True)


def log(msg: str, t0: float) -> None:
    err.print(f"[dim]{time.perf_counter() - t0:7.1f}s[/dim] {msg}")


def mean_std(xs: list[float]) -> dict[str, float]:
    """Mean and sample standard deviation (0 for a single seed)."""
    a = np.asarray(xs, dtype=np.float64)
    return {
        "mean": round(float(a.mean()), 4),
        "std": round(float(a.std(ddof=1)) if len(a) > 1 else 0.0, 4),
    }
