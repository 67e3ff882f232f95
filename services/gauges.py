"""The gauges measured on a schedule rather than on events, run as a supervised component."""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from services.running import Running
    from training.registry import RolloutState

log = logging.getLogger(__name__)


class Gauges:
    """Periodic gauges: consumer lag (Kafka end offsets vs the buffer), freshness, champion.

    Also re-sets every other gauge, which Ray would otherwise drop once it stops changing.
    """

    def __init__(self, running: Running) -> None:
        self.running = running

    def run(self, stop: threading.Event) -> None:
        while True:
            self.measure()
            self.running.metrics.components(self.running.supervisor.restarts)
            self.running.metrics.refresh()
            if stop.wait(self.running.settings.supervisor.gauges_every_s):
                return

    def live(self, state: RolloutState) -> None:
        """The live trial's figures (rollout.live), zeros when none runs."""
        m = self.running.metrics
        test = state.trial.test if state.trial is not None else None
        for outcome, n in (("a_won", test.losses if test else 0),
                           ("b_won", test.wins if test else 0),
                           ("tie", test.ties if test else 0)):  # fmt: skip
            m.gauge("live_trial", float(n), tags={"outcome": outcome})
        for team in ("a", "b"):
            n = getattr(state.trial, f"{team}_clicks") if state.trial is not None else 0
            m.gauge("live_clicks", float(n), tags={"team": team})
        m.gauge("live_log_lr", test.log_lr if test else 0.0)
        paused = state.paused_until is not None and state.paused_until > time.time()
        m.gauge("paused", 1.0 if paused else 0.0)

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
        state = r.registry.rollout_state()
        serving = chosen or state.serving or champion
        self.live(state)
        if serving is not None and serving in r.registry.versions():
            r.metrics.freshness(r.registry.meta(serving).get("data_max_ts"))
