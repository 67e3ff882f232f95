"""Starting and stopping the pieces of a running system, shared by `up`, `demo` and tests.

Every long-running piece (ingest, the history actor, the gauges, and with ``serve_forever`` the
loop and the rollout controller) runs under one ``Supervisor``: a piece that dies is restarted with
backoff and counted in ``streamtune_component_restarts``; one that keeps dying stops the service.
With ``rollout.in_cluster`` the rollout controller is a detached actor instead
(services/control.py), restarted by Ray and outliving `up`.
The caller's main thread stays free to react to signals; ``shutdown`` stops everything in order.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

from services.errors import ServiceError
from services.loop import ContinualLoop
from services.loop_state import STATE_FILE
from services.metrics import StreamMetrics
from services.settings import Settings
from services.supervisor import Supervisor
from serving.context import start_context
from serving.ingress import choose_for_local_ray
from serving.rollout import RolloutController
from streams.buffer import EventBuffer
from streams.ingest import Ingestor
from training.registry import Registry
from training.round import RoundConfig

log = logging.getLogger(__name__)

# A freshly created history actor first rebuilds users' histories from the whole buffer.
_FIRST_PING_S = 180.0
# Whether init_ray started a local Ray in this process (rather than connecting to a cluster).
_started_local_ray = False


def round_config(s: Settings) -> RoundConfig:
    return RoundConfig(model=s.model, trainer=s.trainer, replay=s.replay, gate=s.gate)


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
    choose_for_local_ray(s.serving)  # Serve reads its ingress from the nodes' environment
    log.info("starting a local Ray; Serve's HTTP ingress: %s", s.serving.ingress)
    ray.init(
        num_cpus=max(os.cpu_count() or 1, math.ceil(needed)),
        include_dashboard=dashboard,
        dashboard_host="127.0.0.1",  # loopback only unless the user runs their own cluster
        log_to_driver=False,
    )
    global _tracker
    if _tracker is None:  # one per process, however many local Rays it starts
        _tracker = threading.Thread(target=_track_descendants, name="track-descendants",
                                    daemon=True)  # fmt: skip
        _tracker.start()


@dataclass
class Running:
    settings: Settings
    buffer: EventBuffer
    registry: Registry
    ingestor: Ingestor
    loop: ContinualLoop
    controller: RolloutController | None
    context: Any
    supervisor: Supervisor
    metrics: StreamMetrics
    serving: bool = False
    control: Any = None  # the rollout actor's handle (rollout.in_cluster), which outlives `up`
    _stopped: bool = field(default=False, repr=False)

    @property
    def stop_event(self) -> threading.Event:
        return self.supervisor.stop

    def serve_forever(self) -> None:
        """Also supervise the continual loop and (with Serve) the rollout controller."""
        self.supervisor.add("loop", self.loop.run)
        if self.controller is not None:  # its own thread: rollouts never wait for a round
            self.supervisor.add("rollout", self.controller.run)

    def stop(self, timeout: float = 60.0) -> None:
        """Graceful: every component is told to stop; ingest flushes what it holds first."""
        # Set the event before reading ``ingestor``: a restarting ingest either is the one read
        # here or sees the event and never starts.
        self.supervisor.stop.set()
        if self.controller is not None:
            self.controller.nudge()  # it waits on its own wake-up, not on the stop event
        self.ingestor.stop()
        t = self.supervisor.threads.get("ingest")
        if t is not None:
            t.join(timeout)
        self._stopped = True


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
    holder: dict[str, Running] = {}

    def new_ingestor() -> Ingestor:
        def on_flush(seg: Any, stats: Any) -> None:
            try:
                metrics.on_flush(seg, stats, member=ingestor.member)
            except Exception:  # metrics must never stop ingest
                log.debug("metrics update failed", exc_info=True)

        ingestor = Ingestor(s.kafka, s.topics, s.ingest, buffer, on_flush=on_flush)
        return ingestor

    attempts = [0]

    def run_ingest(stop_ev: threading.Event) -> None:
        running = holder["r"]
        attempts[0] += 1
        if attempts[0] > 1:  # a restart: a fresh consumer, nothing pending (the buffer resumes)
            running.ingestor = new_ingestor()
        if stop_ev.is_set():
            return
        running.ingestor.run()
        if not stop_ev.is_set() and s.ingest.idle_exit_s is not None:
            stop_ev.wait()  # batch-mode settings: ingest ended by design, not a failure

    context = controller = control = None
    if serve_http:
        from ray import serve

        serve.start(http_options={"host": s.serving.host, "port": s.serving.port})
    if s.rollout.in_cluster:  # the history actor serves this `up`'s app or one deployed on its own
        from services.control import ensure_control_plane

        context, control = ensure_control_plane(s, owns_app=serve_http)
    elif serve_http:
        context = start_context(s.kafka, s.topics, s.buffer, s.serving)
        controller = _controller(registry, s, context, metrics)

    def record(result: Any, rec: dict[str, Any]) -> None:
        try:
            if result.promoted:  # roll it out now, not at the controller's next poll
                if controller is not None:
                    controller.nudge()
                elif control is not None:  # a rollout actor of an older release has no nudge:
                    control.nudge.remote()  # it still finds the version at its next poll
        except Exception:
            log.debug("rollout nudge failed", exc_info=True)
        try:
            metrics.on_round(result, rec["seconds"], registry.champion(), rec.get("phases"))
            metrics.gauge("never_trained", float(loop.never_trained()))
        except Exception:
            log.debug("metrics update failed", exc_info=True)
        if on_round is not None:
            on_round(result, rec)

    loop = ContinualLoop(buffer, registry, round_config(s), s.loop, s.state_dir / STATE_FILE,
                         on_round=record)  # fmt: skip
    running = Running(s, buffer, registry, new_ingestor(), loop, controller, context, sup, metrics,
                      serving=serve_http, control=control)  # fmt: skip
    holder["r"] = running
    sup.add("ingest", run_ingest)
    if context is not None:
        sup.add("history", HistoryWatch(running).run)
    sup.add("gauges", Gauges(running).run)
    return running


def _controller(
    registry: Registry, s: Settings, context: Any, metrics: StreamMetrics
) -> RolloutController:
    def on_event(event: Any) -> None:
        try:
            metrics.on_rollout(event)
            meta = registry.meta(event.version)
            metrics.freshness(meta.get("data_max_ts"))
            if event.kind == "rollout":
                metrics.on_live(meta.get("spans", []), event.at)
        except Exception:
            log.debug("metrics update failed", exc_info=True)

    return RolloutController(registry, s.serving, s.rollout, context, on_event=on_event)


class HistoryWatch:
    """The history actor (a Ray actor, not a thread) is alive iff it answers a ping in time."""

    def __init__(self, running: Running) -> None:
        self.running = running
        self.fresh = True  # the actor was just created: its first answer may take a while
        self.dead = False

    def run(self, stop: threading.Event) -> None:
        import ray
        from ray.exceptions import GetTimeoutError, RayActorError

        r, cfg = self.running, self.running.settings.supervisor
        if self.dead:
            self._recreate()
        while not stop.wait(0 if self.fresh else cfg.liveness_s):
            timeout = _FIRST_PING_S if self.fresh else cfg.liveness_timeout_s
            try:
                ray.get(r.context.snapshot.remote([]), timeout=timeout)
            except (RayActorError, GetTimeoutError) as err:
                self.dead = True
                raise ServiceError(f"history actor dead or unresponsive: {err}") from err
            self.fresh = False

    def _recreate(self) -> None:
        import ray

        from serving.context import find_context

        r, s = self.running, self.running.settings
        with contextlib.suppress(Exception):  # already dead is fine
            ray.kill(r.context, no_restart=True)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and find_context() is not None:
            time.sleep(0.2)  # the name is free once the old actor is gone
        r.context = start_context(s.kafka, s.topics, s.buffer, s.serving)
        if r.controller is not None:
            r.controller.context = r.context
        self.dead, self.fresh = False, True
        log.warning("history actor recreated")


class Gauges:
    """Periodic gauges: consumer lag (Kafka end offsets vs the buffer), freshness, champion.

    Also re-sets every other gauge, which Ray would otherwise drop once it stops changing.
    """

    def __init__(self, running: Running) -> None:
        self.running = running

    def run(self, stop: threading.Event) -> None:
        while True:
            self.measure()
            self.running.metrics.refresh()
            if stop.wait(self.running.settings.supervisor.gauges_every_s):
                return

    def measure(self) -> None:
        from kafka.errors import KafkaError

        from streams.admin import topic_lag

        r, s = self.running, self.running.settings
        # Here, not after every flush: it reads every live segment's record, and ingest flushes
        # several times a second (between compactions, thousands of segments: 8% of the demo's
        # interpreter time went to it).
        r.metrics.gauge("buffer_rows", float(r.buffer.stats().rows))
        try:
            lag = topic_lag(s.kafka, s.topics.events, r.buffer.watermark())
            r.metrics.gauge("lag", float(sum(lag.values())))
        except KafkaError as err:  # a broker outage is ingest's problem, not the gauges'
            log.warning("consumer lag unavailable: %s", err)
        champion = r.registry.champion()
        if champion is not None:
            r.metrics.gauge("champion", float(champion))
        chosen = r.controller.current if r.controller is not None else None
        serving = chosen or r.registry.rollout_state().serving or champion
        if serving is not None and serving in r.registry.versions():
            r.metrics.freshness(r.registry.meta(serving).get("data_max_ts"))


# -- a clean stop ---------------------------------------------------------------------------


@contextlib.contextmanager
def stop_on_signals(stop: threading.Event) -> Iterator[list[int]]:
    """SIGINT/SIGTERM set ``stop`` (the main thread then shuts down); yields the signals seen."""
    seen: list[int] = []

    def handler(signum: int, frame: FrameType | None) -> None:
        seen.append(signum)
        stop.set()

    old = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield seen
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)


def reinstall(stop: threading.Event, seen: list[int]) -> None:
    """Ray's ``init`` installs its own SIGTERM handler in the driver; put ours back."""

    def handler(signum: int, frame: FrameType | None) -> None:
        seen.append(signum)
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, handler)


def shutdown(
    running: Running | None,
    broker: Any = None,
    budget_s: float = 25.0,
    serve: bool = True,
    say: Callable[[str], None] | None = None,
) -> list[str]:
    """Stop everything in order: ingest (flushed), ``broker`` if given, Serve, Ray, leftovers.

    Ray's shutdown ends Train workers mid-round; registration is atomic, so the registry never
    holds a partial version. Returns what did not stop cleanly (for the log).
    """
    deadline = time.monotonic() + budget_s
    left: list[str] = []
    # Taken now: once the raylet is gone, its agents are re-parented and no longer look like ours.
    started = _descendants()

    def step(name: str, fn: Callable[[], Any], limit_s: float | None = None) -> None:
        """Run ``fn``; past ``limit_s`` leave it be (the final reap kills what it would have)."""
        t0 = time.monotonic()
        if say is not None:
            say(f"stopping {name} ...")
        errors: list[BaseException] = []

        def call() -> None:
            try:
                fn()
            except BaseException as err:  # keep going: every later step still has to run
                errors.append(err)

        worker = threading.Thread(target=call, name=f"stop-{name}", daemon=True)
        worker.start()
        worker.join(None if limit_s is None else max(0.5, limit_s))
        if worker.is_alive():
            log.warning("stopping %s took over %.0fs; going on", name, time.monotonic() - t0)
            left.append(f"{name} (timed out)")
        elif errors:
            log.warning("stopping %s failed: %s", name, errors[0])
            left.append(name)
        if say is not None:
            say(f"stopped {name} in {time.monotonic() - t0:.1f}s")

    def remaining(reserve: float) -> float:
        return deadline - time.monotonic() - reserve

    if running is not None and not running._stopped:
        step(
            "ingest", lambda: running.stop(timeout=max(1.0, min(10.0, deadline - time.monotonic())))
        )
    ingest = running.supervisor.threads.get("ingest") if running is not None else None
    if ingest is not None and ingest.is_alive():
        left.append("ingest (flush still running)")
    loop = running.supervisor.threads.get("loop") if running is not None else None
    if loop is not None and loop.is_alive():
        # A round mid-training holds the loop thread in a blocking call to Ray Train's controller:
        # if Ray shut down under it, Ray would end this whole process from that thread. End the
        # round first (its checkpoints stay; registration never happened), then let the thread go.
        step("round", lambda: _end_round(started, loop, min(15.0, remaining(8.0))))
    if running is not None and running.loop.session is not None:
        # Its run's controller waits on Ray from a thread of this process, as a round does.
        step("training session", lambda: running.loop.close(max(1.0, min(10.0, remaining(8.0)))))
    if running is not None and running.controller is not None:
        # Its thread and a first deploy still in flight call Ray: both end before Ray does.
        rollout = running.supervisor.threads.get("rollout")
        ctl = running.controller
        step("rollout", lambda: _end_rollout(ctl, rollout, min(20.0, remaining(8.0))))
    if broker is not None:
        # Before Ray: nothing left needs it once ingest has flushed, and a driver that Ray
        # brings down mid-shutdown must not leave a broker behind in its own session.
        step(
            "broker",
            lambda: broker.down(timeout_s=max(2.0, min(15.0, deadline - time.monotonic()))),
        )
    import ray

    if ray.is_initialized():
        in_cluster = running is not None and running.control is not None
        # A local Ray this process started takes Serve down with it. Serve's own graceful stop
        # waits on replicas and the GCS, and at the end of every `make demo` it ran into its
        # 10 s limit, which then cut Ray's shutdown short and left its processes to the reap.
        if (
            serve
            and not in_cluster
            and not _started_local_ray
            and (running is None or running.serving)
        ):
            # (In cluster mode the app and its control plane stay up without `up`.)
            from ray import serve as ray_serve

            step("serve", ray_serve.shutdown, limit_s=min(10.0, remaining(6.0)))
        step("ray", ray.shutdown, limit_s=remaining(3.0))
    step("leftover processes", lambda: _reap(started, deadline))
    return left


def _end_rollout(
    controller: RolloutController, thread: threading.Thread | None, timeout: float
) -> None:
    """Let the rollout thread see the stop, and a background ``serve.run`` finish."""
    deadline = time.monotonic() + timeout
    controller.nudge()
    if thread is not None:
        thread.join(max(0.1, deadline - time.monotonic()))
    if not controller.close(max(0.1, deadline - time.monotonic())) or (
        thread is not None and thread.is_alive()
    ):
        raise TimeoutError(f"the rollout controller was still busy after {timeout:.0f}s")


def _end_round(procs: list[Any], loop: threading.Thread, timeout: float) -> None:
    """SIGKILL this Ray's Train controller (local Ray only), then wait for the loop thread."""
    import psutil

    for p in procs:
        with contextlib.suppress(psutil.Error):
            if "TrainController" in " ".join(p.cmdline()[:1]):
                p.kill()
    loop.join(max(0.5, timeout))


# Every process this one has started, as last seen (pid -> psutil.Process, which knows its start
# time, so a recycled pid is never mistaken for ours). Ctrl-C in a terminal signals the whole
# foreground group: Ray's raylet may exit before ``shutdown`` looks, and its agents, reparented,
# are no longer our children then; they are still in here.
_seen: dict[int, Any] = {}
_SEEN_EVERY_S = 2.0
_tracker: threading.Thread | None = None


def _descendants() -> list[Any]:
    import psutil

    try:
        now = psutil.Process().children(recursive=True)
    except psutil.Error:
        now = []
    _seen.update((p.pid, p) for p in now)
    for pid, p in list(_seen.items()):  # a long `up` starts and ends many Ray workers
        if not p.is_running():
            _seen.pop(pid, None)  # (the tracking thread may have dropped it first)
    return list(_seen.values())


def _track_descendants() -> None:
    while True:
        _descendants()
        time.sleep(_SEEN_EVERY_S)


def _reap(procs: list[Any], deadline: float) -> list[str]:
    """Wait briefly (2 s at most) for processes we started to end, then kill the rest.

    Ray's dashboard and runtime-env agents notice their raylet is gone only on their next poll;
    a stop must not depend on that.
    """
    import psutil

    _, alive = psutil.wait_procs(procs, timeout=max(0.5, min(2.0, deadline - time.monotonic())))
    killed = []
    for p in alive:
        with contextlib.suppress(psutil.Error):
            killed.append(f"{p.pid} {p.name()}")
            p.kill()
    psutil.wait_procs(alive, timeout=2.0)
    if killed:
        log.warning("killed processes that outlived the stop: %s", ", ".join(killed))
    return []
