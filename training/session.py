"""A long-lived training run: one Ray Train run whose workers stay up from round to round.

``training.round.train`` builds a ``TorchTrainer`` per round and pays Ray Train's start-up (the
worker group, the process group, imports: ~10-16 s on this machine) before every round's first
step. A ``TrainingSession`` pays it once. Its workers (``worker.rounds_loop_per_worker``) wait on
the session's feeder actor for the next round, train it with a fresh DeepSpeed engine (the item
table grows between rounds) and hand rank 0's weights back through the feeder; the driver's
``train`` returns them exactly as ``training.round.train`` does, so gating and registration are
unchanged, one version per round.

Faults: the run has ``FailureConfig(max_failures=-1)``. A worker that dies restarts the group from
the run's last checkpoint; the feeder hands out the unfinished round again and the checkpoint
(its progress names the round) resumes it after its last finished epoch. A round the run cannot
finish - the run itself ended - raises ``RoundFailedError``.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import OrderedDict
from typing import Any

from training.data import Examples
from training.errors import RoundFailedError
from training.model import Recommender
from training.round import RoundConfig, round_job, run_config, scaling_config


class RoundFeeder:
    """The meeting point of the driver and the workers (a threaded Ray actor)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._rounds: OrderedDict[str, dict[str, Any]] = OrderedDict()  # posted, not finished
        self._results: dict[str, tuple[dict[str, Any], dict[str, float]]] = {}
        self._stopped = False

    def post(self, round_id: str, job: dict[str, Any]) -> None:
        with self._cond:
            self._rounds[round_id] = job
            self._cond.notify_all()

    def next_round(self, after: str | None) -> dict[str, Any] | None:
        """The oldest unfinished round other than ``after`` (the one this worker just finished,
        which rank 0 may not have reported yet); None once the session is closing."""
        with self._cond:
            while not self._stopped:
                for round_id, job in self._rounds.items():
                    if round_id != after:
                        return {"id": round_id, **job}
                self._cond.wait(timeout=1.0)
            return None

    def round_done(self, round_id: str, state: dict[str, Any], metrics: dict[str, float]) -> None:
        with self._cond:
            if self._rounds.pop(round_id, None) is not None:  # once, even if reported again
                self._results[round_id] = (state, metrics)
            self._cond.notify_all()

    def result(
        self, round_id: str, timeout_s: float
    ) -> tuple[dict[str, Any], dict[str, float]] | None:
        with self._cond:
            self._cond.wait_for(lambda: round_id in self._results, timeout=timeout_s)
            return self._results.pop(round_id, None)

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify_all()


class TrainingSession:
    """The driver's handle on a long-lived run; ``train`` is ``training.round.train``'s twin.

    Started by the first ``train``; the run's shape (workers, GPUs, storage) comes from the
    config of that first round. ``close`` ends the run.
    """

    def __init__(self) -> None:
        self._feeder: Any = None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self.run_name: str | None = None

    def _start(self, cfg: RoundConfig) -> None:
        import ray
        from ray.train.torch import TorchTrainer

        from training.worker import rounds_loop_per_worker

        if not ray.is_initialized():
            ray.init(include_dashboard=False)
        feeder_cls = ray.remote(num_cpus=0, max_concurrency=64)(RoundFeeder)  # type: ignore[call-overload]
        self._feeder = feeder_cls.remote()
        self.run_name = f"session-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
        trainer = TorchTrainer(
            rounds_loop_per_worker,
            train_loop_config={
                "feeder": self._feeder,
                "trainer_config": cfg.trainer.model_dump(mode="json"),
            },
            scaling_config=scaling_config(cfg),
            run_config=run_config(cfg, self.run_name, max_failures=-1),
        )

        def fit() -> None:
            try:
                trainer.fit()
            except BaseException as err:  # the run is over; train() reports it
                self._error = err

        self._thread = threading.Thread(target=fit, name="training-session", daemon=True)
        self._thread.start()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def train(
        self,
        init: Recommender,
        teacher: Recommender | None,
        examples: Examples,
        cfg: RoundConfig,
        cold: bool = False,
        run_id: str | None = None,
    ) -> tuple[Recommender, dict[str, float]]:
        """Train one round on the session's workers; returns the model and its last metrics."""
        import ray

        if self._thread is None:
            self._start(cfg)
        elif not self.running:
            raise RoundFailedError(f"the training session has ended: {self._error!r}")
        round_id = run_id or uuid.uuid4().hex[:16]
        data, job_config = round_job(init, teacher, examples, cfg, cold)
        data_ref = ray.put(data)  # held here until the round is done: the workers read it
        ray.get(self._feeder.post.remote(round_id, {"data": [data_ref], "config": job_config}))
        while True:
            got = ray.get(self._feeder.result.remote(round_id, 1.0))
            if got is not None:
                break
            if not self.running:
                raise RoundFailedError(
                    f"the training session ended during round {round_id}: {self._error!r}"
                )
        state, metrics = got
        model = Recommender.from_state(init.cfg, {k: v.copy() for k, v in state.items()})  # own it
        model.eval()
        return model, {k: float(v) for k, v in metrics.items() if isinstance(v, int | float)}

    def close(self, timeout_s: float = 60.0) -> None:
        """End the run: the workers finish their loop and ``fit`` returns."""
        import ray

        if self._feeder is None:
            return
        ray.get(self._feeder.stop.remote())
        if self._thread is not None:
            self._thread.join(timeout_s)
        ray.kill(self._feeder)
        self._feeder = None
