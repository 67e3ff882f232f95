"""A client that keeps asking a live Serve app for recommendations and records every answer.

Also the version that such runs roll back from: ``register_broken_copy``.

Used where rollouts happen under traffic (the cluster test, ``bench.cluster``): each answer's time,
HTTP status (0 = no answer) and the model version that gave it, so a run can say which version
served when and how many requests failed.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import httpx
import torch

from training.registry import Registry, write_content


class LiveClient:
    """``threads`` loops posting /recommend with ``history`` (the model answers, not popularity)."""

    def __init__(
        self, url: str, history: list[str], threads: int = 2, pause_s: float = 0.05
    ) -> None:
        self.url, self.history, self.pause_s = url, history, pause_s
        self.stop = threading.Event()
        self.results: list[tuple[float, int, int | None]] = []  # (unix time, status, version)
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]

    def _run(self) -> None:
        with httpx.Client(timeout=15) as c:
            while not self.stop.is_set():
                try:
                    r = c.post(f"{self.url}/recommend", json={"history": self.history, "k": 5})
                    ok = r.status_code == 200
                    got = (r.status_code, r.json().get("version") if ok else None)
                except httpx.HTTPError:
                    got = (0, None)
                self.results.append((time.time(), *got))
                time.sleep(self.pause_s)

    def wait_for(self, version: int, timeout: float) -> float:
        """Until the last answers all come from ``version``; returns the seconds it took."""
        t0 = time.time()
        while time.time() - t0 < timeout:
            tail = self.results[-6:]
            if len(tail) == 6 and all(v == version for _, _, v in tail):
                return time.time() - t0
            time.sleep(0.5)
        raise TimeoutError(f"Serve did not move to v{version}: {self.results[-6:]}")

    def failed(self, since: float = 0.0, until: float = float("inf")) -> int:
        return sum(1 for t, st, _ in self.results if since <= t < until and st != 200)

    def __enter__(self) -> LiveClient:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=20)


def register_broken_copy(reg: Registry, of: int) -> int:
    """``of``'s vocabulary with weights that overflow at request time (finite, so registration
    takes them): a version that looks fine offline and fails every live request with a history."""
    lv = reg.load(of)
    broken = lv.model
    with torch.no_grad():
        broken.backbone.wpe.weight.mul_(1e30)

    def write(d: Path) -> None:
        write_content(d, broken, reg.content(of))

    meta = {k: v for k, v in reg.meta(of).items() if k in ("model_config", "watermark")}
    return reg.register(write, meta, promote=False, reason="broken on purpose")
