"""Starting the pieces of a running system, shared by `up`, `demo` and tests.

Every long-running piece (ingest, the history actor, the gauges, and with ``serve_forever`` the
loop and the rollout controller) runs under one ``Supervisor``: a piece that dies is restarted with
backoff and counted in ``streamtune_component_restarts``; one that keeps dying stops the service.
With ``rollout.in_cluster`` the rollout controller is a detached actor instead
(services/control.py), restarted by Ray and outliving `up`.
The caller's main thread stays free to react to signals; ``services.stopping.shutdown`` stops
everything in order.
"""

from __future__ import annotations

import logging
import math
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from services import descendants
from services.gauges import Gauges
from services.history_watch import HistoryWatch
from services.loop import ContinualLoop
from services.loop_state import STATE_FILE
from services.metrics import StreamMetrics
from services.running import Running
from services.settings import Settings
from services.supervisor import Run, Supervisor
from serving.config import ServingConfig
from serving.context import start_context
from serving.heap import freeze_startup
from serving.ingress import choose_for_local_ray
from serving.rollout import RolloutController
from serving.streak import Streak
from streams.buffer import EventBuffer
from streams.ingest import Ingestor
from training.registry import Registry
from training.round import RoundConfig

# Running and Gauges live in modules of their own; tests and benchmarks reach them through here.
__all__ = [
    "Gauges",
    "Running",
    "init_ray",
    "round_config",
    "start",
    "start_broker_and_ray",
    "started_local_ray",
]

log = logging.getLogger(__name__)

# Whether init_ray started a local Ray in this process (rather than connecting to a cluster).
_started_local_ray = False

# Ray settings of a local Ray that streamtune starts, unless the environment sets them. Ray
# Train's preemption watcher is an actor per worker group that polls for node drains: a one-node
# Ray started here is never drained, and the actor costs ~0.1 GiB (a cluster keeps Ray's default).
LOCAL_RAY_ENV = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}


def round_config(s: Settings) -> RoundConfig:
    return RoundConfig(model=s.model, trainer=s.trainer, replay=s.replay, gate=s.gate, tune=s.tune)


def started_local_ray() -> bool:
    """Whether ``init_ray`` started a local Ray in this process (which takes Serve down with it)."""
    return _started_local_ray


def local_ray_environ(serving: ServingConfig) -> None:
    """This process's environment for a local Ray it starts next, whose raylet and workers inherit
    it: Serve's ingress switches (``choose_for_local_ray``) and ``LOCAL_RAY_ENV`` (unless set).
    Everything that starts a local Ray (``init_ray``, the benchmarks) goes through here."""
    choose_for_local_ray(serving)
    for key, value in LOCAL_RAY_ENV.items():
        os.environ.setdefault(key, value)


def init_ray(address: str | None, s: Settings, dashboard: bool = True) -> None:
    """Connect to ``address``, or start a local Ray instance sized for the whole system.

    Locally, Ray's CPU count is logical: a 2-core laptop must still fit the trainer's workers
    beside the Serve replicas, or a round would wait forever for resources Serve holds.
    """
    import ray

    if ray.is_initialized():
        return
    if address:
        ray.init(address=address)
        return
    global _started_local_ray
    needed = s.trainer.num_workers * s.trainer.cpus_per_worker + 0.25 * s.serving.replicas + 1
    _started_local_ray = True
    local_ray_environ(s.serving)
    log.info("starting a local Ray; Serve's HTTP ingress: %s", s.serving.ingress)
    _init_from_a_lasting_thread(
        num_cpus=max(os.cpu_count() or 1, math.ceil(needed)),
        include_dashboard=dashboard,
        dashboard_host="127.0.0.1",  # loopback only unless the user runs their own cluster
        log_to_driver=False,
    )
    descendants.track()


def start_broker_and_ray(
    address: str | None, s: Settings, stop: threading.Event, broker: Callable[[], None]
) -> bool:
    """``broker()`` (start the broker and its topics) beside ``init_ray``, not before it.

    Both start processes that mostly wait for themselves (a JVM, Ray's GCS and raylet), so side
    by side they are ready sooner than one after the other. The broker's process is its own
    session's leader, so the thread that starts it may end. Returns False if ``stop`` was set
    meanwhile (nothing more should start); raises the broker's error after Ray's, if any.
    """
    # Leaving the pool waits for the broker's start: a stop must see the broker, to stop it.
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="broker-start") as pool:
        started = pool.submit(broker)
        if not stop.is_set():
            init_ray(address, s)
        started.result()  # the broker's error, raised here
    return not stop.is_set()


def _init_from_a_lasting_thread(**init: Any) -> None:
    """``ray.init(**init)`` from a thread that lives as long as this process.

    Why: a local Ray's GCS and raylet die with the *thread* that started them (Ray sets
    PR_SET_PDEATHSIG in them, and Linux sends it when the forking thread exits). The demo starts
    Ray from its work thread, which ends at a stop: Ray's core died at the first moment of every
    stop, and the ordered stop then waited out timeouts against it (27 s of a 25 s budget)."""
    import ray

    if threading.current_thread() is threading.main_thread():
        ray.init(**init)
        return
    started = threading.Event()
    failed: list[BaseException] = []

    def parent() -> None:
        try:
            ray.init(**init)
        except BaseException as err:  # raised in the caller's thread below
            failed.append(err)
        started.set()
        threading.Event().wait()  # never set: this thread is the Ray processes' parent

    threading.Thread(target=parent, name="ray-parent", daemon=True).start()
    started.wait()
    if failed:
        raise failed[0]


def start(
    s: Settings,
    serve_http: bool = True,
    on_round: Any = None,
    stop: threading.Event | None = None,
) -> Running:
    """Ingest, serving context + Serve (optional), gauges, and the loop, on an initialised Ray.

    Ingest, the history actor's watchdog and the gauges start supervised now; the loop and the
    rollout controller when the caller asks (``Running.serve_forever``), since tests and the demo
    drive rounds themselves.
    """
    metrics = StreamMetrics()
    sup = Supervisor(s.supervisor, stop, on_restart=metrics.restart)
    buffer = EventBuffer(s.buffer)
    registry = s.open_registry()
    context, controller, control = _start_serving(s, serve_http, registry, metrics)

    nudges = Streak(log, "nudging the rollout after a promotion")
    round_metrics = Streak(log, "updating a round's metrics")

    def record(result: Any, rec: dict[str, Any]) -> None:
        try:
            if result.promoted:  # roll it out now, not at the controller's next poll
                if controller is not None:
                    controller.nudge()
                elif control is not None:  # a rollout actor of an older release has no nudge:
                    control.nudge.remote()  # it still finds the version at its next poll
        except Exception as err:
            nudges.failed(err, "the rollout finds the version at its next poll")
        else:
            nudges.ok()
        try:
            metrics.on_round(result, rec["seconds"], registry.champion(), rec.get("phases"))
            metrics.gauge("never_trained", float(loop.never_trained()))
        except Exception as err:
            round_metrics.failed(err, "the dashboards miss those rounds")
        else:
            round_metrics.ok()
        if on_round is not None:
            on_round(result, rec)

    loop = ContinualLoop(buffer, registry, round_config(s), s.loop, s.state_dir / STATE_FILE,
                         on_round=record)  # fmt: skip
    ingestor = _new_ingestor(s, buffer, metrics)
    running = Running(s, buffer, registry, ingestor, loop, controller, context, sup, metrics,
                      serving=serve_http, control=control)  # fmt: skip
    sup.add("ingest", _ingest_component(running))
    if context is not None:
        sup.add("history", HistoryWatch(running).run)
    sup.add("gauges", Gauges(running).run)
    # Everything started: what this process imported and built stays out of later full
    # collections, which would stall ingest and rounds (serving.heap).
    freeze_startup()
    return running


def _start_serving(
    s: Settings, serve_http: bool, registry: Registry, metrics: StreamMetrics
) -> tuple[Any, RolloutController | None, Any]:
    """Serve, the history actor, and what rolls versions out: a controller in this process, or
    with ``rollout.in_cluster`` the cluster's rollout actor. Returns (context, controller,
    control), each None where not started."""
    context = controller = control = None
    if serve_http:
        from ray import serve

        serve.start(http_options={"host": s.serving.host, "port": s.serving.port})
    if s.rollout.in_cluster:  # the history actor serves this `up`'s app or one deployed on its own
        from services.control import ensure_control_plane

        context, control = ensure_control_plane(s, owns_app=serve_http)
    elif serve_http:
        context = start_context(s.kafka, s.topics, s.buffer, s.serving, registry)
        controller = _controller(registry, s, context, metrics)
    return context, controller, control


def _controller(
    registry: Registry, s: Settings, context: Any, metrics: StreamMetrics
) -> RolloutController:
    updates = Streak(log, "updating the rollout metrics")

    def on_event(event: Any) -> None:
        try:
            metrics.on_rollout(event)
            meta = registry.meta(event.version)
            metrics.freshness(meta.get("data_max_ts"))
            if event.kind == "rollout":
                metrics.on_live(meta.get("spans", []), event.at)
        except Exception as err:
            updates.failed(err, "the dashboards miss those rollout events")
        else:
            updates.ok()

    return RolloutController(registry, s.serving, s.rollout, context, on_event=on_event)


def _new_ingestor(s: Settings, buffer: EventBuffer, metrics: StreamMetrics) -> Ingestor:
    updates = Streak(log, "updating the ingest metrics")

    def on_flush(seg: Any, stats: Any) -> None:
        try:
            metrics.on_flush(seg, stats, member=ingestor.member)
        except Exception as err:  # metrics must never stop ingest
            updates.failed(err, "ingest goes on; the dashboards miss those segments")
        else:
            updates.ok()

    ingestor = Ingestor(s.kafka, s.topics, s.ingest, buffer, on_flush=on_flush)
    return ingestor


def _ingest_component(running: Running) -> Run:
    """Ingest as a supervised component, replacing ``running.ingestor`` on each restart."""
    s, attempts = running.settings, 0

    def run_ingest(stop_ev: threading.Event) -> None:
        nonlocal attempts
        attempts += 1
        if attempts > 1:  # a restart: a fresh consumer, nothing pending (the buffer resumes)
            running.ingestor = _new_ingestor(s, running.buffer, running.metrics)
        if stop_ev.is_set():
            return
        running.ingestor.run()
        if not stop_ev.is_set() and s.ingest.idle_exit_s is not None:
            stop_ev.wait()  # batch-mode settings: ingest ended by design, not a failure

    return run_ingest
