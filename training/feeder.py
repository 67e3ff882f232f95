"""The meeting point of a training session's round posters and its workers (a Ray actor).

Its own module, apart from ``training.session``, because Ray imports an actor's class module in
the actor's process: the feeder holds round jobs (object references and JSON configs) and rank
0's weights as numpy arrays, so it needs neither torch nor the model. With torch imported its
process held 0.88 GiB RSS while `up` served 1M users; without, 0.18 (docs/benchmarks.md).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Final, Literal

IDLE: Final = "idle"  # the feeder's answer when it had no round within the asked wait
# Worker groups that may take one round before it fails. Not trainer.max_failures: that budgets
# a per-round run's restarts, and the session has always retried a round whose worker died
# (tests and the cluster's node-loss recovery rely on it); this only ends a round that kills
# every group it reaches (e.g. a deterministic error), which would otherwise stall the session.
ROUND_ATTEMPTS = 4
# Results kept for a re-posted round (a retried round task): whole models, so only the latest.
KEEP_RESULTS = 4
Pick = tuple[str, int] | Literal["idle"] | None  # (round id, generation) / nothing yet / stop


@dataclass
class Outcome:
    """A round's end: rank 0's weights (numpy) and last metrics, or why it failed."""

    state: dict[str, Any] | None
    metrics: dict[str, float]
    error: str | None = None


@dataclass
class _Round:
    job: dict[str, Any]  # {"data": [ObjectRef] or None, "config": {...}}
    gen: int = 0  # bumped by every re-post: which poster's data a worker took
    attempts: int = 0  # worker groups that took it


class RoundFeeder:
    """The meeting point of the round posters and the workers (a threaded Ray actor).

    Rank 0 of the worker group alone takes rounds (``next_round``) and tells the other ranks
    which, so a group trains one round together and each group counts one attempt.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._rounds: OrderedDict[str, _Round] = OrderedDict()  # posted, not finished
        self._results: OrderedDict[str, Outcome] = OrderedDict()
        self._stopped = False
        self._ended: str | None = None  # why the run is over, once it is
        self._handed_out = 0  # attempts, all rounds together

    def post(self, round_id: str, job: dict[str, Any]) -> None:
        """Queue a round; idempotent per ``round_id``: a finished round is not queued again (its
        result is handed out again) and a queued one keeps its place, with the new data."""
        with self._cond:
            if round_id in self._results:
                return
            queued = self._rounds.get(round_id)
            if queued is None:
                self._rounds[round_id] = _Round(job)
            else:  # the poster was retried: its data is alive, the first poster's may not be
                queued.job, queued.gen = job, queued.gen + 1
            self._cond.notify_all()

    def next_round(self, timeout_s: float) -> Pick:
        """(rank 0) The oldest round with data to train, counted as an attempt; IDLE after
        ``timeout_s`` without one; None once the session is closing or over."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while not self._stopped and self._ended is None:
                for round_id, r in list(self._rounds.items()):
                    if r.job["data"] is None:  # lost with its poster: waits for a re-post
                        continue
                    if r.attempts >= ROUND_ATTEMPTS:
                        why = f"round {round_id} failed {r.attempts} times on the session's workers"
                        self._finish(round_id, Outcome(None, {}, why))
                        continue
                    r.attempts += 1
                    self._handed_out += 1
                    return round_id, r.gen
                left = deadline - time.monotonic()
                if left <= 0:
                    return IDLE
                self._cond.wait(left)
            return None

    def job(self, round_id: str, gen: int) -> dict[str, Any] | None:
        """The round as ``next_round`` handed it out; None if it was re-posted or ended since."""
        with self._cond:
            r = self._rounds.get(round_id)
            return r.job if r is not None and r.gen == gen and r.job["data"] else None

    def not_taken(self, round_id: str, gen: int) -> None:
        """(rank 0) The group could not read the round's data: no attempt was made, and if that
        data is still the round's, it went with its poster (until the round is posted again)."""
        with self._cond:
            r = self._rounds.get(round_id)
            if r is not None:
                r.attempts = max(0, r.attempts - 1)
                self._handed_out -= 1
                if r.gen == gen:
                    r.job = {**r.job, "data": None}

    def round_done(self, round_id: str, state: dict[str, Any], metrics: dict[str, float]) -> None:
        with self._cond:
            if self._rounds.pop(round_id, None) is not None:  # once, even if reported again
                self._finish(round_id, Outcome(state, metrics))

    def _finish(self, round_id: str, outcome: Outcome) -> None:
        self._rounds.pop(round_id, None)
        self._results[round_id] = outcome
        while len(self._results) > KEEP_RESULTS:
            self._results.popitem(last=False)
        self._cond.notify_all()

    def result(self, round_id: str, timeout_s: float) -> Outcome | None:
        """The round's outcome, or None if it has none within ``timeout_s``."""
        with self._cond:
            self._cond.wait_for(
                lambda: round_id in self._results or self._ended is not None, timeout=timeout_s
            )
            if round_id in self._results:
                return self._results[round_id]
            if self._ended is not None:
                return Outcome(None, {}, f"the training session has ended: {self._ended}")
            return None

    def end(self, reason: str) -> None:
        """The run is over (``fit`` returned or raised): rounds without a result fail."""
        with self._cond:
            self._ended = reason
            self._cond.notify_all()

    def stats(self) -> dict[str, Any]:
        """What the feeder holds (for tests and for looking into a stuck session)."""
        with self._cond:
            return {"queued": list(self._rounds), "parked": [k for k, r in self._rounds.items()
                    if r.job["data"] is None], "results": list(self._results),
                    "handed_out": self._handed_out, "ended": self._ended}  # fmt: skip

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify_all()
