"""The control plane inside the cluster: the rollout controller as a named, detached Ray actor.

With ``rollout.in_cluster`` (``up --address`` turns it on) the controller does not run as a thread
of ``up`` but here, on the head node, next to the history actor (``serving.context``): Ray restarts
it when its process dies, it outlives the ``up`` that started it, and a restarted ``up`` finds it
by name instead of starting a second one. Its state is the registry's rollout record, so a
restarted actor resumes mid-watch. ``owns_app`` says whether it deploys the Serve app itself
(``up`` with Serve) or only records its choice for an app deployed on its own (``up --no-serve``
beside ``serve deploy deploy/serve.yaml`` or a RayService), whose replicas follow the record.

``app_from_env`` is that app's builder (the import path in deploy/serve.yaml): it also makes sure
the control plane runs in the app's cluster, so an app deployed on its own follows the champion,
has live history and is rolled back even when no `up` runs beside it. Both paths find the same
named actors (one controller per cluster).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING, Any

from serving.config import RolloutConfig, ServingConfig
from serving.context import CONTROL_NAMESPACE, find_context, on_head, start_context
from serving.rollout import RolloutController, RolloutEvent
from training.registry import Registry

if TYPE_CHECKING:
    from ray.serve import Application

    from services.settings import Settings

log = logging.getLogger(__name__)

ROLLOUT_ACTOR = "streamtune-rollout"


class RolloutService:
    """One controller, stepped every ``poll_s`` by its own thread; calls are serialised."""

    def __init__(
        self, registry: Registry, serving: ServingConfig, rollout: RolloutConfig, owns_app: bool
    ) -> None:
        from services.metrics import StreamMetrics

        self.metrics = StreamMetrics()
        self.lock = threading.Lock()
        self.errors = 0
        self.controller = RolloutController(
            registry, serving, rollout, find_context(), on_event=self._on_event, owns_app=owns_app
        )
        self._thread = threading.Thread(target=self._run, name="rollout", daemon=True)
        self._thread.start()

    def _on_event(self, event: RolloutEvent) -> None:
        self.metrics.on_rollout(event)
        meta = self.controller.registry.meta(event.version)
        self.metrics.freshness(meta.get("data_max_ts"))
        if event.kind == "rollout":
            self.metrics.on_live(meta.get("spans", []), event.at)

    def nudge(self) -> None:
        """A round just promoted a version: step now instead of at the next ``poll_s``."""
        self.controller.nudge()

    def _run(self) -> None:
        refreshed = 0.0
        while True:
            if time.monotonic() - refreshed > 5.0:  # this process's series stay exported
                self.metrics.refresh()
                refreshed = time.monotonic()
            try:
                self.step()
            except Exception:  # a bad poll (registry or history actor away) is retried
                self.errors += 1
                log.exception("rollout step failed")
                self.controller.context = find_context()  # recreated under the same name?
            self.controller.pause()

    def step(self) -> dict[str, Any] | None:
        with self.lock:
            if self.controller.context is None:
                self.controller.context = find_context()
                if self.controller.context is None:
                    return None  # no history actor yet: nothing to judge or report with
            ev = self.controller.step()
            return None if ev is None else ev.__dict__

    def status(self) -> dict[str, Any]:
        with self.lock:
            return {
                **self.controller.status(),
                "owns_app": self.controller.owns_app,
                "step_errors": self.errors,
                "events": [e.__dict__ for e in self.controller.events[-50:]],
            }


def start_rollout_service(
    registry: Registry, serving: ServingConfig, rollout: RolloutConfig, owns_app: bool
) -> Any:
    """Start the rollout actor on the head node, or return the one already running."""
    import ray

    actor = ray.remote(num_cpus=0, max_concurrency=4)(RolloutService)  # type: ignore[call-overload]
    return actor.options(
        name=ROLLOUT_ACTOR,
        namespace=CONTROL_NAMESPACE,
        get_if_exists=True,
        lifetime="detached",
        max_restarts=-1,
        max_task_retries=-1,
        resources=on_head(),
    ).remote(registry, serving, rollout, owns_app)


def ensure_control_plane(s: Settings, owns_app: bool) -> tuple[Any, Any]:
    """The history shards, the context actor and the rollout actor of this cluster (started if
    missing)."""
    registry = s.open_registry()
    context = start_context(s.kafka, s.topics, s.buffer, s.serving, registry)
    control = start_rollout_service(registry, s.serving, s.rollout, owns_app)
    return context, control


def app_from_env(args: dict[str, Any] | None = None) -> Application:
    """Entry point for Serve config files and KubeRay: settings from STREAMTUNE_* variables.

    Read once, here (in the cluster, by Serve's build task), and handed to every replica in its
    init args: replicas read no environment.
    """
    from services.settings import load_settings
    from serving.application import build_app

    s = load_settings()
    reg = s.open_registry()
    champion = reg.champion()
    if champion is None:
        raise LookupError(f"no champion in {reg.location}: train a first version before serving")
    ensure_control_plane(s, owns_app=False)
    return build_app(reg, s.serving, champion)
