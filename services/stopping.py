"""A clean stop of what ``services.runtime.start`` (and `up`, `demo`) started, in order and within
one time budget: ingest (flushed), what still calls Ray from a thread of this process, the broker,
Serve, Ray, and the processes that outlive them."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from services import runtime
from services.descendants import descendants, reap
from services.running import Running
from serving.rollout import RolloutController

log = logging.getLogger(__name__)

# What a long-lived training run gets to end on its own before the stop kills its controller.
SESSION_GRACE_S = 4.0


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
    steps = _Steps(budget_s, say)
    # Taken now: once the raylet is gone, its agents are re-parented and no longer look like ours.
    started = descendants()
    if running is not None:
        _stop_threads(steps, running, started)
    if broker is not None:
        _stop_broker(steps, broker)
    if local_ray_gone(started):
        # Ray's raylet or GCS exited before the stop reached it (they die with the thread that
        # started them, which init_ray keeps alive, or of a failure of their own). What they
        # started is then orphaned and answers nothing, and Ray's own shutdown below would wait
        # on it (its last metrics export and event flush time out: 11-15 s of a 25 s budget).
        log.warning("Ray's core exited before the stop reached it: ending Ray's orphans first")
        steps.run("Ray's orphans", lambda: _kill_all(started))
    _stop_serve_and_ray(steps, running, serve)
    steps.run("leftover processes", lambda: reap(started, steps.deadline))
    return steps.left


def stop_threads(running: Running, budget_s: float = 25.0) -> list[str]:
    """The first part of ``shutdown``: every thread of this process that calls Ray ends (ingest
    flushed, the training session closed, the round ended, the rollout controller and the
    watchers stopped), so Ray can then be shut down under none of them. For a caller that shuts
    Serve and Ray down itself; returns what did not stop cleanly."""
    steps = _Steps(budget_s, None)
    _stop_threads(steps, running, descendants())
    return steps.left


def _stop_threads(steps: _Steps, running: Running, started: list[Any]) -> None:
    _stop_ingest(steps, running)
    # The long-lived run first (the default): closing it ends a round in flight on it too (the
    # round's client gets the run's end). Ending the round first killed Train's controllers, so
    # the session's run died under it: an error in the log of every stop that came mid-round.
    _close_training_session(steps, running, started)
    _end_round(steps, running, started)
    _stop_rollout(steps, running)
    _stop_watchers(steps, running)


class _Steps:
    """Runs the stop's steps one after another against one deadline, noting what did not stop."""

    def __init__(self, budget_s: float, say: Callable[[str], None] | None) -> None:
        self.deadline = time.monotonic() + budget_s
        self.say = say
        self.left: list[str] = []

    def until_deadline(self) -> float:
        return self.deadline - time.monotonic()

    def remaining(self, reserve: float) -> float:
        return self.deadline - time.monotonic() - reserve

    def run(self, name: str, fn: Callable[[], Any], limit_s: float | None = None) -> None:
        """Run ``fn``; past ``limit_s`` leave it be (the final reap kills what it would have)."""
        t0 = time.monotonic()
        if self.say is not None:
            self.say(f"stopping {name} ...")
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
            self.left.append(f"{name} (timed out)")
        elif errors:
            log.warning("stopping %s failed: %s", name, errors[0])
            self.left.append(name)
        if self.say is not None:
            self.say(f"stopped {name} in {time.monotonic() - t0:.1f}s")


def _stop_ingest(steps: _Steps, running: Running) -> None:
    if not running.stopped:
        steps.run(
            "ingest",
            lambda: running.stop(timeout=max(1.0, min(10.0, steps.until_deadline()))),
        )
    ingest = running.supervisor.threads.get("ingest")
    if ingest is not None and ingest.is_alive():
        steps.left.append("ingest (flush still running)")


def _end_round(steps: _Steps, running: Running, started: list[Any]) -> None:
    loop = running.supervisor.threads.get("loop")
    if loop is not None and loop.is_alive():
        # A round mid-training holds the loop thread in a blocking call to Ray Train's controller:
        # if Ray shut down under it, Ray would end this whole process from that thread. End the
        # round first (its checkpoints stay; registration never happened), then let the thread go.
        steps.run("round", lambda: _kill_round(started, loop, min(15.0, steps.remaining(8.0))))


def _close_training_session(steps: _Steps, running: Running, started: list[Any]) -> None:
    if running.loop.session is not None:
        # Its run's controller waits on Ray from a thread of this process, as a round does. A
        # healthy run ends ~1 s after its feeder stops (its controller's poll, trainer.poll_s),
        # a round in flight finished first; past SESSION_GRACE_S its controller (local Ray) is
        # killed, as a round's is.
        # Not cut short by the stop: Ray must not go down under it (its waits are bounded).
        limit = max(1.0, min(10.0, steps.remaining(8.0)))
        grace = 0.5 if local_ray_gone(started) else SESSION_GRACE_S  # it cannot end by itself
        steps.run(
            "training session",
            lambda: running.loop.close(min(grace, limit), lambda: _kill_controllers(started)),
        )


def _stop_rollout(steps: _Steps, running: Running) -> None:
    if running.controller is not None:
        # Its thread and a first deploy still in flight call Ray: both end before Ray does.
        rollout = running.supervisor.threads.get("rollout")
        ctl = running.controller
        steps.run("rollout", lambda: _end_rollout(ctl, rollout, min(20.0, steps.remaining(8.0))))


def _stop_watchers(steps: _Steps, running: Running) -> None:
    # The gauges and the context's liveness check call Ray from threads of their own (a metric
    # set, a snapshot); Ray shut down under such a call ends this process with a segfault. They
    # end at their next look at the stop event, which ingest's stop has set.
    rest = [t for n, t in running.supervisor.threads.items()
            if n not in ("ingest", "loop", "rollout")]  # fmt: skip

    def join() -> None:
        deadline = time.monotonic() + min(15.0, steps.remaining(6.0))
        for t in rest:
            t.join(max(0.1, deadline - time.monotonic()))
        alive = [t.name for t in rest if t.is_alive()]
        if alive:
            raise TimeoutError(f"still running: {', '.join(alive)}")

    if rest:
        steps.run("watchers", join, limit_s=min(15.0, steps.remaining(6.0)))


def _stop_broker(steps: _Steps, broker: Any) -> None:
    # Before Ray: nothing left needs it once ingest has flushed, and a driver that Ray
    # brings down mid-shutdown must not leave a broker behind in its own session.
    steps.run(
        "broker",
        lambda: broker.down(timeout_s=max(2.0, min(15.0, steps.until_deadline()))),
    )


def _stop_serve_and_ray(steps: _Steps, running: Running | None, serve: bool) -> None:
    import ray

    if not ray.is_initialized():
        return
    in_cluster = running is not None and running.control is not None
    # A local Ray this process started takes Serve down with it. Serve's own graceful stop
    # waits on replicas and the GCS, and at the end of every `make demo` it ran into its
    # 10 s limit, which then cut Ray's shutdown short and left its processes to the reap.
    if (
        serve
        and not in_cluster
        and not runtime.started_local_ray()
        and (running is None or running.serving)
    ):
        # (In cluster mode the app and its control plane stay up without `up`.)
        from ray import serve as ray_serve

        steps.run("serve", ray_serve.shutdown, limit_s=min(10.0, steps.remaining(6.0)))
    steps.run("ray", ray.shutdown, limit_s=steps.remaining(3.0))


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


def _kill_round(procs: list[Any], loop: threading.Thread, timeout: float) -> None:
    """SIGKILL this Ray's Train controller (local Ray only), then wait for the loop thread."""
    _kill_controllers(procs)
    loop.join(max(0.5, timeout))


def local_ray_gone(procs: list[Any]) -> bool:
    """Whether the raylet or GCS among ``procs`` (a local Ray this process started) has exited."""
    import psutil

    for p in procs:
        try:
            if p.status() == psutil.STATUS_ZOMBIE and p.name() in ("raylet", "gcs_server"):
                return True  # (this process, their parent, reaps them in Ray's shutdown)
        except psutil.Error:
            continue
    return False


def _kill_all(procs: list[Any]) -> None:
    import psutil

    for p in procs:
        with contextlib.suppress(psutil.Error):
            p.kill()


def _kill_controllers(procs: list[Any]) -> None:
    """SIGKILL the Train controllers among ``procs`` (this local Ray's): their runs end at once,
    their workers with them (an actor's children die with it)."""
    import psutil

    for p in procs:
        with contextlib.suppress(psutil.Error):
            if "TrainController" in " ".join(p.cmdline()[:1]):
                p.kill()
