"""The continual loop: buffer -> training round -> gate -> registry (-> rollout, via serving).

Rounds run continuously: the next round starts as soon as the previous one is registered and at
least ``min_round_events`` events are pending (or fewer have waited ``max_pending_s``); it takes
everything pending up to ``max_round_events``, so rounds stay small on a slow stream and grow with
a fast one. The first version waits for ``first_round_events``. The loop plans the round's data
between two watermarks (segment names and offsets, never rows) and runs the planned round: with
``loop.round_on_cluster`` as a Ray task on a training node that reads the data itself, otherwise
in this process (``services.round_job``); with ``loop.long_lived_trainer`` either way trains on
one Ray Train run kept up across rounds.
The registry is the loop's memory: the data a round trains on starts at the watermark of the
latest registered version, so a loop killed at any point resumes without skipping or
re-training data (a round that never registered simply runs again). A rejected round's events
are carried forward (``training.carry``) into the next round, not lost to learning.

One writer per slice: at start the loop repairs registrations a crash interrupted (see
``Registry.repair``), and a round registers only if the latest version is still the one whose
watermark its data starts at. If another process (a second ``streamtune train --once`` beside a
running ``up``) registered first, the round is dropped (ConcurrentRoundError) and the next trigger
starts from the new watermark, so no slice is registered twice.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from services.config import LoopConfig
from services.loop_state import read_state
from services.round_job import plan_round, run_on_cluster, run_planned
from streams.buffer import EventBuffer
from streams.storage import atomic_write_bytes
from training.errors import ConcurrentRoundError, EmptyRoundError, RoundTooSmallError
from training.registry import Registry
from training.round import RoundConfig, RoundResult, warm_up
from training.session import TrainingSession

log = logging.getLogger(__name__)

CARRY_TRIES = 3  # rounds on a quiet stream's carried events alone before waiting for new ones


class ContinualLoop:
    def __init__(
        self,
        buffer: EventBuffer,
        registry: Registry,
        round_cfg: RoundConfig,
        cfg: LoopConfig,
        state_file: Path,
        on_round: Any = None,
    ) -> None:
        self.buffer, self.registry, self.round_cfg, self.cfg = buffer, registry, round_cfg, cfg
        self.state_file = state_file
        self.on_round = on_round
        self.last_round_at = time.monotonic()
        self.last_compact = time.monotonic()
        self.pending_since: float | None = None  # when should_train first saw pending events
        self.retry_at_pending: int | None = None  # after a too-small round: wait for this many
        self.carry_tries = 0  # rounds in a row on rejected rounds' events alone
        self._carry_of: tuple[int, int] | None = None  # (latest version, its carried events)
        # loop.long_lived_trainer: one Ray Train run for every round (started by the first).
        self.session = TrainingSession() if cfg.long_lived_trainer else None
        self.last_skip: str | None = None  # why the last run_once returned None (for the CLI)
        for d in registry.repair():
            log.warning("repaired interrupted registration: v%d %s (%s)", d.version, d.decision,
                        d.reason)  # fmt: skip
        if not cfg.round_on_cluster:  # rounds run in this process: their title cache is here
            warm_up(registry, round_cfg)

    # -- where we are -------------------------------------------------------------------
    def trained_watermark(self) -> dict[str, int]:
        """Offsets the lineage has consumed: the latest registered version's watermark."""
        return self._watermark_of(self.registry.latest())

    def _watermark_of(self, version: int | None) -> dict[str, int]:
        if version is None:
            return {}
        wm: dict[str, int] = self.registry.meta(version)["watermark"]
        return wm

    def pending(self) -> int:
        """Records in the buffer past the trained watermark (dead letters included)."""
        done = self.trained_watermark()
        return sum(max(0, end - done.get(tp, 0)) for tp, end in self.buffer.watermark().items())

    def should_train(self) -> bool:
        n = self.pending()
        if n == 0:
            return self._carry_due()
        if self.retry_at_pending is not None:
            if n < self.retry_at_pending:
                return False
            self.retry_at_pending = None
        if self.pending_since is None:  # a round's trigger wait runs from here
            self.pending_since = time.monotonic()
        first = self.registry.champion() is None
        enough = self.cfg.first_round_events if first else self.cfg.min_round_events
        return n >= enough or self._quiet(first)

    def _carry_due(self) -> bool:
        """Nothing new, but the latest round was rejected and its events wait in the carry: once
        the stream has been quiet for ``max_pending_s``, a round trains them alone (a few tries;
        new events end the wait anyway, since every round takes the carry along)."""
        if self.carry_tries >= CARRY_TRIES:
            return False
        quiet = time.monotonic() - self.last_round_at >= self.cfg.max_pending_s
        return quiet and self._carried() > 0

    def carry_waiting(self) -> bool:
        """The latest round was rejected and a round will still try its carried events alone
        (``_carry_due``): the end of a stream is not trained yet."""
        return self.carry_tries < CARRY_TRIES and self._carried() > 0

    def _carried(self) -> int:
        """Events waiting in the latest version's carry (0 without a champion to train on)."""
        latest = self.registry.latest()
        if latest is None or self.registry.champion() is None:
            return 0
        if self._carry_of is None or self._carry_of[0] != latest:
            self._carry_of = (latest, int(self.registry.meta(latest).get("carry_events", 0)))
        return self._carry_of[1]

    def _quiet(self, first: bool = False) -> bool:
        """Pending events have waited ``max_pending_s`` (``first_round_wait_s`` for the first
        version): train them however few they are."""
        since = self.pending_since
        wait = self.cfg.first_round_wait_s if first else self.cfg.max_pending_s
        return since is not None and time.monotonic() - since >= wait

    # -- one round ----------------------------------------------------------------------
    def run_once(self, upto: dict[str, int] | None = None) -> RoundResult | None:
        """One round on the events between the trained watermark and ``upto`` (default: all).

        With no champion (every version so far rejected) nothing has been learned yet, so the
        round trains from scratch on everything buffered, not just on what is new. Returns None
        when there is too little to train on, or when another process registered this slice
        first.
        """
        base = self.registry.latest()  # the slice starts at this version's watermark: pin it
        fresh = self.registry.champion() is None
        after = {} if fresh else self._watermark_of(base)
        if upto is None:
            upto = self.buffer.watermark()
            if not fresh:  # a fresh start learns from everything there is
                upto = cap_round(after, upto, self.cfg.max_round_events)
        carry_only = self.pending() == 0
        if carry_only and self._carried() == 0:
            self.last_skip = "nothing new to train on and nothing carried"
            return None
        min_events = 0 if carry_only else 1 if self._quiet() else self.cfg.min_round_events
        self.carry_tries = self.carry_tries + 1 if carry_only else 0
        plan = plan_round(self.buffer, after, upto, fresh, min_events)
        self.last_round_at = time.monotonic()
        self.last_skip = None
        t0 = time.monotonic()
        waited, self.pending_since = (
            (t0 - self.pending_since if self.pending_since is not None else None),
            None,
        )
        searches = fresh and self.round_cfg.tune.first_version
        if searches:
            self._free_session()
        try:
            registry, extra = self.registry.expecting(base), {"after_watermark": after}
            if self.cfg.round_on_cluster:
                # The round task on a training node trains on the long-lived run, if any. A client
                # starts the run's workers now, before a searching round's search: that round
                # trains on a run of its own, and the session starts with the next round.
                client = (
                    self.session.client(self.round_cfg) if self.session and not searches else None
                )
                outcome = run_on_cluster(plan, registry, self.round_cfg, extra, trainer=client)
            else:
                trainer = self.session.train if self.session is not None else None
                outcome = run_planned(plan, registry, self.round_cfg, extra, trainer)
        except ConcurrentRoundError as err:
            self.last_skip = f"another process registered this slice first: {err}"
            log.warning("round dropped: %s", self.last_skip)
            return None
        except (EmptyRoundError, RoundTooSmallError) as err:
            # Nothing registered, the watermark stays: the next round takes these events too.
            # Try again once min_round_events more have arrived, not at every poll.
            self.last_skip = str(err)
            self.retry_at_pending = self.pending() + self.cfg.min_round_events
            log.info("skip round: %s", self.last_skip)
            return None
        if outcome.result is None:
            self.last_skip = outcome.skipped
            log.info("skip round: %s", self.last_skip)
            return None
        result = outcome.result
        phases = {"read": outcome.read_s, **result.phases}
        if waited is not None:  # seen by should_train (not for a round asked for directly)
            phases = {"trigger_wait": waited, **phases}
        record = {**asdict(result), "started": t0, "seconds": time.monotonic() - t0,
                  "registered_at": time.time(),
                  "read_s": outcome.read_s, "segments": len(plan.segments), "node": outcome.node,
                  "after_watermark": after, "phases": phases}  # fmt: skip
        self._persist(record)
        if self.on_round is not None:
            self.on_round(result, record)
        return result

    def _free_session(self) -> None:
        """Before a first round that searches its recipe: the session's idle workers hold CPUs
        the search's trials need (on 2 cores all of them: the trials would wait until the search
        timed out). It is closed here, and started again by the round's training, after the
        search (``run_round`` searches before it trains)."""
        if self.session is not None and self.session.running:
            log.info("closing the training session for the first version's recipe search")
            self.session.close()
            self.session = TrainingSession()

    def _persist(self, record: dict[str, Any]) -> None:
        """Append the round's record; past ``keep_rounds`` the oldest go, their counts kept."""
        state = self.state()
        state["rounds"].append(record)
        totals = state.setdefault("totals", {})
        totals["rounds"] = totals.get("rounds", 0) + 1
        totals["never_trained_events"] = totals.get("never_trained_events", 0) + sum(
            int(s.get("events", 0)) for s in record.get("dropped", [])
        )
        del state["rounds"][: -self.cfg.keep_rounds]
        atomic_write_bytes(self.state_file, json.dumps(state, default=str).encode())

    def state(self) -> dict[str, Any]:
        """The loop's record: ``rounds`` (newest ``keep_rounds``) and running ``totals``."""
        # Read each time: another process (`train --once` beside `up`) may have appended.
        return read_state(self.state_file)

    def never_trained(self) -> int:
        """Events let go from the carry so far (never trained on, by rule; dead letters apart)."""
        return int(self.state().get("totals", {}).get("never_trained_events", 0))

    def close(self, timeout_s: float = 30.0, stuck: Callable[[], None] | None = None) -> None:
        """End the long-lived training run, if there is one (before Ray goes down); ``stuck``:
        see ``TrainingSession.close``."""
        if self.session is not None:
            self.session.close(timeout_s, stuck)

    # -- forever ------------------------------------------------------------------------
    def run(self, stop: threading.Event) -> None:
        """Until ``stop``: train when due, compact. Rollouts run in their own thread (serving)."""
        if self.cfg.nice:
            _yield_cpu(self.cfg.nice)
        while not stop.is_set():
            registered = False
            if self.should_train():
                try:
                    registered = self.run_once() is not None
                except Exception as err:  # a failed round must not kill the service
                    if stop.is_set():  # e.g. the stop closed the training run under the round
                        log.info("training round ended by the stop: %s", err)
                    else:
                        log.exception("training round failed; will retry at the next trigger")
            if time.monotonic() - self.last_compact > self.cfg.compact_every_s:
                self.buffer.compact()
                self.buffer.apply_retention()
                self.last_compact = time.monotonic()
            if not registered:  # after a round, what arrived meanwhile is due at once
                stop.wait(self.cfg.poll_s)


def cap_round(after: dict[str, int], upto: dict[str, int], cap: int) -> dict[str, int]:
    """``upto`` moved back so that at most ``cap`` events lie past ``after``: each partition
    gives up the same share of its pending events, so the round keeps the stream's time order
    across partitions as closely as offsets allow."""
    pending = {tp: max(0, end - after.get(tp, 0)) for tp, end in upto.items()}
    total = sum(pending.values())
    if total <= cap:
        return upto
    share = cap / total
    return {tp: after.get(tp, 0) + int(n * share) if n else upto[tp] for tp, n in pending.items()}


def _yield_cpu(nice: int) -> None:
    """This thread at niceness ``nice`` (Linux: niceness is per thread), and torch computing in
    the calling thread only: its pool threads would keep the priority they started with."""
    import torch

    torch.set_num_threads(1)
    tid = threading.get_native_id()
    try:
        os.setpriority(os.PRIO_PROCESS, tid, max(nice, os.getpriority(os.PRIO_PROCESS, tid)))
    except OSError as err:  # e.g. a sandbox that forbids it: rounds still run, only unfairly
        log.warning("could not set the loop thread's niceness to %d: %s", nice, err)
