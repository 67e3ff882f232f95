"""A long-lived training run: one Ray Train run whose workers stay up from round to round.

``training.round_train.train`` builds a ``TorchTrainer`` per round and pays Ray Train's start-up
(the worker group, the process group, imports: ~10-16 s on this machine) before every round's
first step. A ``TrainingSession`` pays it once. Its workers (``worker.rounds_loop_per_worker``)
wait on the session's feeder actor for the next round, train it with a fresh DeepSpeed engine (the
item table grows between rounds) and hand rank 0's weights back through the feeder.

Rounds reach the run through a ``SessionClient`` (``TrainingSession.client``): a small picklable
``TrainFn`` holding the feeder's handle, so the round can be prepared anywhere, in the driver
(``TrainingSession.train``) or in a round task on a training node (``services.round_job``). It
returns what ``training.round_train.train`` returns, so gating and registration are unchanged, one
version per round.

Faults: the run has ``FailureConfig(max_failures=-1)``. A worker that dies restarts the group from
the run's last checkpoint; the feeder hands out the unfinished round again and the checkpoint
(its progress names the round) resumes it after its last finished epoch. A round the restarted
groups cannot finish within ``ROUND_ATTEMPTS`` fails, and so does every round of a run that
ended: the client raises ``RoundFailedError`` rather than wait forever. The feeder lives on the
head node, so losing a training node loses neither it nor the rounds it holds. A round task
retried elsewhere (its node died) posts the same round id again: the round keeps its place, its
attempts and its result (the retried poster's data replaces the dead one's, which went with it).
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from training.data import Examples
from training.errors import RoundFailedError
from training.feeder import Outcome, RoundFeeder
from training.model import Recommender
from training.round_config import RoundConfig
from training.round_train import round_job, run_config, scaling_config, set_poll_interval
from training.worker import rounds_loop_per_worker

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SessionClient:
    """Trains rounds on a session's run from any process: a ``training.round_config.TrainFn``."""

    feeder: Any  # the RoundFeeder's actor handle
    run_name: str
    poll_s: float = 10.0  # how often a wait re-checks that the run is still there

    def __call__(
        self,
        init: Recommender,
        teacher: Recommender | None,
        examples: Examples,
        cfg: RoundConfig,
        cold: bool = False,
        run_id: str | None = None,
    ) -> tuple[Recommender, dict[str, float]]:
        """Train one round on the session's workers; returns the model and its last metrics.

        ``run_id`` names the round: posting it again (a retried round task) trains nothing new
        and returns the same result. Raises ``RoundFailedError`` if the run cannot finish it."""
        import ray
        from ray.exceptions import RayActorError

        round_id = run_id or uuid.uuid4().hex[:16]
        data, job_config = round_job(init, teacher, examples, cfg, cold)
        data_ref = ray.put(data)  # owned and held here until the round is done: workers read it
        try:
            ray.get(self.feeder.post.remote(round_id, {"data": [data_ref], "config": job_config}))
            got: Outcome | None = None
            while got is None:
                got = ray.get(self.feeder.result.remote(round_id, self.poll_s))
        except RayActorError as err:  # the driver closed the session, or died and took it along
            raise RoundFailedError(
                f"the training session {self.run_name} is gone (round {round_id}): {err}"
            ) from err
        if got.error is not None or got.state is None:
            raise RoundFailedError(f"round {round_id} in session {self.run_name}: {got.error}")
        model = Recommender.from_state(init.cfg, {k: v.copy() for k, v in got.state.items()})
        model.eval()  # (copies: the arrays Ray hands back are read-only views of its store)
        return model, {k: float(v) for k, v in got.metrics.items() if isinstance(v, int | float)}


class TrainingSession:
    """The driver's handle on a long-lived run; ``train`` is ``training.round_train.train``'s twin.

    Started by the first ``client`` (or ``train``); the run's shape (workers, GPUs, storage)
    comes from that first config. ``close`` ends the run. The run's controller is an actor of
    this process, so the run also ends with it (Ray ends a job's actors with its driver).
    """

    def __init__(self) -> None:
        self._feeder: Any = None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._closed = False
        self.run_name: str | None = None

    def _start(self, cfg: RoundConfig) -> None:
        import ray
        from ray._common.constants import HEAD_NODE_RESOURCE_NAME
        from ray.train.torch import TorchTrainer

        if not ray.is_initialized():
            ray.init(include_dashboard=False)
        # On the head (as serving.context.on_head pins the control plane): a lost training node
        # must not take the queued rounds and their results along with it.
        on_head = {HEAD_NODE_RESOURCE_NAME: 0.001}
        feeder_cls = ray.remote(num_cpus=0, max_concurrency=64, max_restarts=0,  # type: ignore[call-overload]
                                resources=on_head)(RoundFeeder)  # fmt: skip
        feeder = feeder_cls.remote()
        self._feeder, self._error = feeder, None
        self.run_name = f"session-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
        set_poll_interval(cfg.trainer)
        trainer = TorchTrainer(
            rounds_loop_per_worker,
            train_loop_config={
                "feeder": feeder,
                "trainer_config": cfg.trainer.model_dump(mode="json"),
            },
            scaling_config=scaling_config(cfg),
            run_config=run_config(cfg, self.run_name, max_failures=-1),
        )
        name = self.run_name

        def fit() -> None:
            reason = "its workers returned"
            try:
                trainer.fit()
            except BaseException as err:  # the run is over: every waiting round is told why
                self._error = err
                reason = f"{type(err).__name__}: {err}"
                level = logging.INFO if self._closed else logging.ERROR  # closing: expected
                log.log(level, "training session %s ended: %s", name, reason)
            if not ray.is_initialized():  # Ray shut down under the run: nobody is left to tell
                return  # (and a call now would start a Ray instance of its own)
            try:
                ray.get(feeder.end.remote(reason))
            except Exception as err:  # closed and killed already, or Ray going down: none waits
                log.info("training session %s: feeder gone at the run's end: %r", name, err)

        self._thread = threading.Thread(target=fit, name="training-session", daemon=True)
        self._thread.start()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def client(self, cfg: RoundConfig) -> SessionClient:
        """A picklable ``TrainFn`` for this session's run, started now if it is not running.

        A run that ended on its own (an error Ray Train does not retry) is replaced by a new one
        here, so one failure does not fail every later round; rounds already waiting on the old
        run fail with ``RoundFailedError``."""
        if self._closed:
            raise RoundFailedError("the training session is closed")
        if self._thread is not None and not self.running:
            log.warning("training session %s had ended (%r); starting a new run",
                        self.run_name, self._error)  # fmt: skip
            self._drop_feeder()
        if self._thread is None:
            self._start(cfg)
        assert self.run_name is not None
        return SessionClient(self._feeder, self.run_name)

    def train(
        self,
        init: Recommender,
        teacher: Recommender | None,
        examples: Examples,
        cfg: RoundConfig,
        cold: bool = False,
        run_id: str | None = None,
    ) -> tuple[Recommender, dict[str, float]]:
        """Train one round on the session's workers from this process (see ``SessionClient``)."""
        return self.client(cfg)(init, teacher, examples, cfg, cold, run_id)

    def close(
        self,
        timeout_s: float = 60.0,
        stuck: Callable[[], None] | None = None,
        kill_wait_s: float = 5.0,
    ) -> None:
        """End the run: the workers finish their loop and ``fit`` returns. ``stuck``: called when
        it has not within ``timeout_s`` (e.g. ends the run's controller), then up to
        ``kill_wait_s`` more for ``fit`` to return.

        Why a caller may want it: a worker group that fails while the run ends is restarted by
        Ray Train (the run retries forever) before the workers can see the stop, and a restart
        costs ~10 s, past what a stop can wait."""
        import ray

        self._closed = True
        if self._feeder is None:
            return
        try:
            ray.get(self._feeder.stop.remote(), timeout=timeout_s)
        except ray.exceptions.RayError as err:  # the rounds' clients learn it from the kill below
            log.warning("training session %s: could not stop its feeder: %s", self.run_name, err)
        if self._thread is not None:
            self._thread.join(timeout_s)
            if self._thread.is_alive() and stuck is not None:
                log.warning("training session %s did not end within %.0f s; ending its run",
                            self.run_name, timeout_s)  # fmt: skip
                stuck()
                self._thread.join(kill_wait_s)
            if self._thread.is_alive():
                log.warning("training session %s did not end", self.run_name)
        self._drop_feeder()

    def _drop_feeder(self) -> None:
        import ray

        if self._feeder is not None:
            ray.kill(self._feeder)  # its waiting clients raise RoundFailedError
        self._feeder, self._thread = None, None
