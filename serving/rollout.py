"""The rollout controller: Serve follows the registry's champion, and backs off bad versions.

``step()`` (called every ``poll_s`` by the loop service, or by ``run``):
  1. a champion Serve does not serve yet -> in-place rollout (new user_config; each replica loads
     the version beside the current one and swaps, so requests keep flowing);
  2. while a fresh version is watched: if it failed to load, its error rate or p99 latency is over
     the limit, or its click-through on served items collapses against the previous version's,
     roll back to the previous version and record the reason in the registry.
Manual controls: ``status()``, ``promote(version)``, ``rollback(reason)``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from serving.config import RolloutConfig, ServingConfig
from training.registry import Registry


@dataclass
class RolloutEvent:
    kind: str  # "rollout" | "rollback"
    version: int
    reason: str
    seconds: float
    at: float = field(default_factory=time.time)


class RolloutController:
    def __init__(
        self, registry: Registry, serving: ServingConfig, cfg: RolloutConfig, context: Any
    ) -> None:
        self.registry, self.serving, self.cfg, self.context = registry, serving, cfg, context
        self.current: int | None = None
        self.previous: int | None = None
        self.watch_since: float | None = None
        self.events: list[RolloutEvent] = []

    # -- deployment ---------------------------------------------------------------------
    def deploy(self, version: int) -> float:
        """Point the Serve app at ``version``; returns seconds until Serve reports it running."""
        from ray import serve

        from serving.app import build_app

        t0 = time.monotonic()
        serve.run(
            build_app(self.registry.root, self.serving, version),
            name=self.serving.app_name,
            route_prefix="/",
        )
        return time.monotonic() - t0

    def _switch(self, version: int, kind: str, reason: str) -> RolloutEvent:
        seconds = self.deploy(version)
        if kind == "rollout":
            self.previous, self.current = self.current, version
            self.watch_since = time.time()
        else:
            self.current, self.previous = version, None
            self.watch_since = None
        ev = RolloutEvent(kind, version, reason, seconds)
        self.events.append(ev)
        return ev

    # -- the control loop ---------------------------------------------------------------
    def step(self) -> RolloutEvent | None:
        if self.current is not None and self.watch_since is not None:
            verdict = self._judge(self.current)
            if verdict is not None:
                return self.rollback(verdict)
            if time.time() - self.watch_since > self.cfg.watch_s:
                self.watch_since = None  # survived its window
        champion = self.registry.champion()
        if champion is not None and champion != self.current:
            return self._switch(champion, "rollout", "new champion")
        return None

    def _judge(self, version: int) -> str | None:
        import ray

        snap = ray.get(self.context.snapshot.remote())
        failure = snap["load_failures"].get(str(version))
        if failure:
            return f"version {version} failed to load: {failure}"
        stats = snap["versions"].get(str(version))
        if not stats or stats["requests"] < self.cfg.min_requests:
            return None
        if stats["error_rate"] > self.cfg.max_error_rate:
            return (
                f"error rate {stats['error_rate']:.1%} over {stats['requests']} requests "
                f"> {self.cfg.max_error_rate:.1%}"
            )
        if stats["p99_ms"] > self.cfg.max_p99_ms:
            return f"p99 latency {stats['p99_ms']:.0f} ms > {self.cfg.max_p99_ms:.0f} ms"
        prev = snap["versions"].get(str(self.previous)) if self.previous else None
        base = self.cfg.min_clicks_base
        comparable = prev and prev["clicked"] >= base and stats["served"] >= prev["served"] / 4
        if prev and comparable and stats["ctr"] < self.cfg.min_click_ratio * prev["ctr"]:
            return (
                f"click-through {stats['ctr']:.2%} < {self.cfg.min_click_ratio:.0%} of "
                f"version {self.previous}'s {prev['ctr']:.2%}"
            )
        return None

    def rollback(self, reason: str) -> RolloutEvent | None:
        bad, to = self.current, self.previous
        if bad is None:
            return None
        if to is None:
            self.registry.record(bad, "rollback-impossible", reason)
            return None
        self.registry.mark_rolled_back(bad, reason, to=to)
        return self._switch(to, "rollback", reason)

    def promote(self, version: int, reason: str = "manual promote") -> RolloutEvent:
        self.registry.set_champion(version, reason, decision="manual-promote")
        ev = self.step()
        assert ev is not None and ev.version == version
        return ev

    def status(self) -> dict[str, Any]:
        import ray

        snap = ray.get(self.context.snapshot.remote())
        return {
            "champion": self.registry.champion(),
            "serving": self.current,
            "previous": self.previous,
            "watching": self.watch_since is not None,
            "replicas": snap["replicas"],
            "versions": snap["versions"],
            "events": [e.__dict__ for e in self.events[-20:]],
        }

    def run(self, stop: Any, path: Path | None = None) -> None:
        """Poll until ``stop`` (a threading.Event) is set."""
        while not stop.is_set():
            self.step()
            stop.wait(self.cfg.poll_s)
