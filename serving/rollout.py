"""The rollout controller: Serve follows the registry's champion, and backs off bad versions.

``step()`` (called every ``poll_s`` by the loop service, or by ``run``):
  1. a champion Serve does not serve yet -> in-place rollout (new user_config; each replica loads
     the version beside the current one and swaps, so requests keep flowing);
  2. while a fresh version is watched: if it failed to load, its error rate or p99 latency is over
     the limit, or its click-through on served items collapses against the previous version's,
     roll back to the previous version and record the reason in the registry.
Manual controls: ``status()``, ``promote(version)``, ``rollback(reason)``.

The controller's state (the serving version, its rollback target, the watch window's start, and
whether "rollback-impossible" was already recorded) lives in the registry (``RolloutState``), so
a restarted controller knows what Serve serves and what to roll back to. Its first ``step`` in a
new process re-points Serve at the serving version (a "restore"; an in-place no-op if Serve kept
running) and the watch window, if still open, continues where it was.

Click-through is compared over the same stretch of time: with ``t0`` the rollout's start and
``L = now - t0``, the new version's items served in ``[t0, now]`` against the previous version's
items served in ``[t0 - L, now]`` (the equal-length window just before the rollout, plus any
overlap in which it still served), clicks credited to the time the item was served (see
``serving.context``). Comparing against the previous version's lifetime counts would let an old
version's history drown the signal; comparing equal recent windows keeps time-of-day and catalog
drift on both sides. Both sides need their clicks to arrive, so a fresh window slightly favours
the older side; ``min_clicks_base`` and the served-volume check keep tiny windows from deciding.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from serving import live_trial
from serving.config import RolloutConfig, ServingConfig
from serving.errors import RolloutError
from serving.streak import Streak
from training.registry import Registry, RolloutState

log = logging.getLogger(__name__)


LIVE_KEPT = 500  # rollouts remembered in the rollout state: minutes of continuous rounds


@dataclass
class RolloutEvent:
    kind: str  # "rollout" | "rollback" | "restore" | "trial" (canary started) | "discard"
    version: int
    reason: str
    seconds: float
    at: float = field(default_factory=time.time)


class RolloutController:
    def __init__(
        self,
        registry: Registry,
        serving: ServingConfig,
        cfg: RolloutConfig,
        context: Any,
        on_event: Callable[[RolloutEvent], None] | None = None,
        owns_app: bool = True,
    ) -> None:
        self.registry, self.serving, self.cfg, self.context = registry, serving, cfg, context
        self.on_event = on_event
        # False when the Serve app was deployed on its own (`serve deploy deploy/serve.yaml`, a
        # RayService): its replicas follow the serving version in the registry, so the controller
        # only records its choice and waits for them, and never redeploys someone else's app.
        self.owns_app = owns_app
        state = registry.rollout_state()
        self.current: int | None = state.serving
        self.previous: int | None = state.previous
        self.watch_since: float | None = state.watch_since
        self.rollback_impossible: int | None = state.rollback_impossible
        self.live: list[tuple[int, float]] = list(state.live)
        self.trial, self.baseline = state.trial, state.baseline
        self.baseline_since = state.baseline_since
        self.paused_until, self.paused_reason = state.paused_until, state.paused_reason
        self.deployed = False  # has this process pointed Serve anywhere yet?
        self._deploying: threading.Thread | None = None  # the app's first serve.run, if running
        self._deploy_error: Exception | None = None  # how that serve.run failed, if it did
        self.events: list[RolloutEvent] = []
        self._wake = threading.Event()
        self._pause_logged: int | None = None
        self._announcements = Streak(log, "announcing a rollout to the replicas")

    # -- state ----------------------------------------------------------------------------
    def save(self) -> None:
        self.registry.set_rollout_state(
            RolloutState(
                serving=self.current,
                previous=self.previous,
                watch_since=self.watch_since,
                rollback_impossible=self.rollback_impossible,
                live=self.live[-LIVE_KEPT:],
                trial=self.trial,
                baseline=self.baseline,
                baseline_since=self.baseline_since,
                paused_until=self.paused_until,
                paused_reason=self.paused_reason,
            )
        )

    def save_and_announce(self) -> None:
        """Record a change the replicas must see (a trial's versions) and wake them to read it."""
        self.save()
        self._announce()

    def end_trial(self) -> None:
        if self.trial is not None:
            log.info("live trial %s ended: %s", self.trial.id, live_trial.figures(self.trial))
            self.trial = None
            self.save_and_announce()

    def emit(self, ev: RolloutEvent) -> RolloutEvent:
        self.events.append(ev)
        if self.on_event is not None:
            try:
                self.on_event(ev)
            except Exception:  # a metrics hook must never stop rollouts
                log.exception("rollout on_event hook failed")
        return ev

    def _announce(self) -> None:
        """Tell the replicas' followers to read the registry now (a hint; see ServingContext)."""
        if self.context is None:
            return
        try:
            self.context.announce.remote()
        except Exception as err:  # the replicas' own poll still finds the new version
            self._announcements.failed(err, "replicas find the version on their own poll")
        else:
            self._announcements.ok()

    def nudge(self) -> None:
        """A round just promoted a version: step now instead of at the next ``poll_s``."""
        self._wake.set()

    def pause(self) -> None:
        """Between steps: until ``poll_s`` has passed or ``nudge`` was called, whichever first."""
        self._wake.wait(self.cfg.poll_s)
        self._wake.clear()

    # -- deployment ---------------------------------------------------------------------
    def deploy(self, version: int) -> float:
        """Move Serve to ``version``; returns seconds until its replicas serve it.

        The registry's serving version must already say ``version`` (replicas follow it).
        """
        t0 = time.monotonic()
        if self.owns_app and self.context is None:  # nobody to hear the replicas: Serve's wait
            self._run_app(version)
        elif self.owns_app and not self.deployed:
            # serve.run waits for the whole app (replicas and ingress: ~20 s on 2 cores), while
            # the version is live as soon as the replicas answer with it: wait for that, and let
            # Serve finish beside the controller, so the next version is not held up behind it.
            self._deploying = threading.Thread(
                target=self._run_app, args=(version,), name="serve-deploy", daemon=True
            )
            self._deploy_error = None
            self._deploying.start()
            self._await_replicas(version)
        else:
            # An app deployed on its own, or ours already running this code and these settings:
            # the replicas follow the registry's record (announced above); a redeploy would
            # only wait on Serve (~1 s).
            self._await_replicas(version)
        self.deployed = True
        return time.monotonic() - t0

    def close(self, timeout_s: float = 30.0) -> bool:
        """Wait for a ``serve.run`` still running in the background; True once none is.

        Call it before Serve or Ray shut down: a ``serve.run`` that outlives its Ray session goes
        on calling Ray, Ray's auto-connect answers each call by starting a new local session in
        this process, and Ray later ends the whole process (seen in the tests: two stray sessions
        within 2 s of ``ray.shutdown``, and the process gone a minute later).
        """
        t = self._deploying
        if t is not None:
            t.join(timeout_s)
        return t is None or not t.is_alive()

    def _run_app(self, version: int) -> None:
        from ray import serve

        from serving.application import build_app

        try:
            serve.run(
                build_app(self.registry, self.serving, version),
                name=self.serving.app_name,
                route_prefix="/",
            )
        except Exception as err:
            if threading.current_thread() is not self._deploying:
                raise
            self._deploy_error, self.deployed = err, False  # the next step deploys again
            log.exception("deploying the Serve app (v%d) failed; retrying at the next step",
                          version)  # fmt: skip

    def _await_replicas(self, version: int) -> None:
        """Until every live replica reports ``version`` (they follow the registry's record)."""
        import ray

        deadline = time.monotonic() + self.cfg.converge_timeout_s
        while time.monotonic() < deadline:
            if self._deploy_error is not None:
                raise RolloutError(f"deploying the Serve app failed: {self._deploy_error}")
            snap = ray.get(self.context.snapshot.remote([]))
            recent = [d for d in snap["replicas"].values() if time.time() - d["at"] < 5.0]
            if recent and all(d["version"] == str(version) for d in recent):
                return
            if str(version) in snap["load_failures"]:
                return  # judged (and rolled back) by the next step
            time.sleep(0.2)
        log.warning(
            "replicas did not all report v%d within %.0fs (is the Serve app deployed?)",
            version, self.cfg.converge_timeout_s,
        )  # fmt: skip

    def switch(self, version: int, kind: str, reason: str) -> RolloutEvent:
        if kind == "rollout":
            self.previous, self.current = self.current, version
            self.watch_since = time.time()
        else:
            self.current, self.previous = version, None
            self.watch_since = None
        self.save()  # first: replicas of an app deployed on its own follow this record
        self._announce()
        seconds = self.deploy(version)
        if kind == "rollout":  # when its events went live (freshness in `streamtune status`)
            self.live.append((version, time.time()))
            self.save()
        return self.emit(RolloutEvent(kind, version, reason, seconds))

    def _restore(self, version: int) -> RolloutEvent:
        seconds = self.deploy(version)
        why = f"restart: serving v{version} again (rollback target {self.previous})"
        return self.emit(RolloutEvent("restore", version, why, seconds))

    # -- the control loop ---------------------------------------------------------------
    def step(self) -> RolloutEvent | None:
        champion = self.registry.champion()
        if not self.deployed and self.current is not None and champion == self.current:
            return self._restore(self.current)
        if self.current is not None and self.watch_since is not None and self.deployed:
            verdict = self._judge(self.current)
            if verdict is not None:
                return self.rollback(verdict)
            if time.time() - self.watch_since > self.cfg.watch_s:
                self.watch_since = None  # survived its window
                self.save()
        if self.cfg.live != "off" and self.deployed:
            handled, ev = live_trial.step(self, champion)
            if ev is not None or handled:
                return ev
        if champion is not None and champion != self.current and self._paused(champion):
            return None
        if champion is not None and champion != self.current:
            manual = self.manual_rollback(champion)
            if manual is not None:  # `streamtune rollout rollback`: the bad one is no target
                return self.switch(champion, "rollback", manual)
            return self.switch(champion, "rollout", "new champion")
        return None

    def _paused(self, champion: int) -> bool:
        """Promotions paused by a guard rollback: the champion waits (logged once per version)."""
        if self.paused_until is None:
            return False
        if time.time() >= self.paused_until or self.manually_promoted(champion):
            self.paused_until = self.paused_reason = None
            self.save()
            return False
        if self._pause_logged != champion:
            self._pause_logged = champion
            log.warning("v%d not rolled out: promotions paused for %.0f s more (%s)", champion,
                        self.paused_until - time.time(), self.paused_reason)  # fmt: skip
        return True

    def manually_promoted(self, champion: int) -> bool:
        """Whether ``champion`` is the champion because an operator promoted it (no trial, no
        pause holds it back)."""
        for d in reversed(self.registry.decision_log()):
            if d.version == champion:
                return d.decision == "manual-promote"
        return False

    def manual_rollback(self, champion: int) -> str | None:
        """The reason, if the champion moved because someone rolled the serving version back."""
        for d in reversed(self.registry.decision_log()):
            if d.decision == "rollback" and d.version == self.current and d.to == champion:
                return d.reason
            if d.version == champion or d.version == self.current:
                return None  # a later decision about either version: not (only) a rollback
        return None

    def _judge(self, version: int) -> str | None:
        import ray

        snap = ray.get(self.context.snapshot.remote([str(version)]))
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
        return self._judge_clicks(version)

    def _judge_clicks(self, version: int) -> str | None:
        """Click-through of ``version`` vs the previous version over the same window."""
        import ray

        if self.previous is None or self.watch_since is None:
            return None
        now = time.time()
        span = now - self.watch_since
        new = ray.get(self.context.window.remote(str(version), self.watch_since, now))
        base = ray.get(self.context.window.remote(str(self.previous), self.watch_since - span, now))
        if base["clicked"] < self.cfg.min_clicks_base or new["served"] < base["served"] / 4:
            return None  # too little evidence on one side to compare
        if new["ctr"] < self.cfg.min_click_ratio * base["ctr"]:
            return (
                f"click-through {new['ctr']:.2%} ({new['clicked']}/{new['served']}) over the "
                f"last {span:.0f} s < {self.cfg.min_click_ratio:.0%} of version {self.previous}'s "
                f"{base['ctr']:.2%} ({base['clicked']}/{base['served']}) over the same length"
            )
        return None

    def rollback(self, reason: str) -> RolloutEvent | None:
        bad, to = self.current, self.previous
        if bad is None:
            return None
        if to is None:
            if self.rollback_impossible != bad:  # say it once, not on every poll
                self.registry.record(bad, "rollback-impossible", reason)
                self.rollback_impossible = bad
            self.watch_since = None  # nothing left to do for this version
            self.save()
            return None
        self.registry.mark_rolled_back(bad, reason, to=to)
        return self.switch(to, "rollback", reason)

    def promote(self, version: int, reason: str = "manual promote") -> RolloutEvent:
        self.registry.set_champion(version, reason, decision="manual-promote")
        self.paused_until = self.paused_reason = None  # an operator's choice ends a pause
        if self.cfg.live == "canary" and self.deployed:  # ... and skips the canary trial
            self.end_trial()
            return self.switch(version, "rollout", reason)
        ev = self.step()
        if ev is None or ev.version != version or ev.kind == "rollback":
            raise RolloutError(
                f"asked to serve v{version}, but the controller did {ev}: "
                f"Serve is on v{self.current}"
            )
        return ev

    def status(self) -> dict[str, Any]:
        import ray

        snap = ray.get(self.context.snapshot.remote())
        return {
            "champion": self.registry.champion(),
            "serving": self.current,
            "previous": self.previous,
            "watching": self.watch_since is not None,
            "rollback_impossible": self.rollback_impossible,
            "replicas": snap["replicas"],
            "versions": snap["versions"],
            "events": [e.__dict__ for e in self.events[-20:]],
            "live": self.cfg.live,
            "trial": live_trial.status(self.trial),
            "baseline": self.baseline,
            "paused_until": self.paused_until,
            "paused_reason": self.paused_reason,
        }

    def run(self, stop: Any, path: Path | None = None) -> None:
        """Poll until ``stop`` (a threading.Event) is set."""
        while not stop.is_set():
            self.step()
            self.pause()
