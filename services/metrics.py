"""Metrics on the Ray dashboard: ``ray.util.metrics`` instruments for every stage of the loop.

Ray exports them through its metrics agent, so they appear in the dashboard's metrics view and are
scrapeable by Prometheus as ``ray_streamtune_*`` (deploy/grafana/streamtune.json charts them).
Instruments only work inside a Ray process (driver or actor); ``StreamMetrics`` is created there.
``SPECS`` is the single list of names: tests check that each is emitted and that the dashboard
charts nothing else.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from streams.ingest import IngestStats
from streams.segments import Segment


@dataclass(frozen=True)
class Spec:
    kind: str  # "counter" | "gauge" | "histogram"
    name: str  # Prometheus name less the ``ray_`` prefix (and a counter's ``_total``)
    description: str
    tags: tuple[str, ...] = ()
    boundaries: tuple[float, ...] = ()

    @property
    def exported(self) -> tuple[str, ...]:
        """The series names Prometheus sees for this instrument."""
        base = f"ray_{self.name}"
        if self.kind == "counter":
            return (f"{base}_total",)
        if self.kind == "histogram":
            return (f"{base}_bucket", f"{base}_sum", f"{base}_count")
        return (base,)


SPECS: dict[str, Spec] = {
    "ingested": Spec(
        "counter", "streamtune_ingested_events", "Events appended to the buffer.", ("member",)
    ),
    "dead": Spec(
        "counter", "streamtune_dead_lettered_events", "Records sent to the DLQ.", ("reason",)
    ),
    "segments": Spec("counter", "streamtune_buffer_segments_written", "Segments written."),
    "buffer_rows": Spec("gauge", "streamtune_buffer_rows", "Rows in the buffer."),
    "lag": Spec("gauge", "streamtune_consumer_lag", "Records in Kafka not yet in the buffer."),
    "round_s": Spec(
        "histogram",
        "streamtune_round_seconds",
        "Wall time of a training round.",
        boundaries=(5, 10, 20, 40, 80, 160, 320, 640),
    ),
    "phase_s": Spec(
        "histogram",
        "streamtune_round_phase_seconds",
        "Wall time of each part of a round: trigger_wait (first pending event to the round's "
        "start), read, prepare, train, gate, register.",
        ("phase",),
        boundaries=(0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 40, 80, 160),
    ),
    "samples_s": Spec(
        "gauge",
        "streamtune_train_samples_per_second",
        "Training throughput of the latest round (all workers).",
    ),
    "ndcg": Spec("gauge", "streamtune_eval_ndcg10", "NDCG@10 of a version.", ("version", "set")),
    "champion": Spec("gauge", "streamtune_champion_version", "Current champion version."),
    "decisions": Spec(
        "counter", "streamtune_gate_decisions", "Promote/reject decisions.", ("decision",)
    ),
    "rollouts": Spec("counter", "streamtune_rollouts", "Serve rollouts and rollbacks.", ("kind",)),
    "freshness_s": Spec(
        "gauge",
        "streamtune_model_freshness_seconds",
        "Age of the newest event the serving model was trained on.",
    ),
    "event_freshness_s": Spec(
        "histogram",
        "streamtune_event_freshness_seconds",
        "Model freshness per event: its timestamp to the rollout of the first version trained "
        "on it (21 quantile points per round).",
        boundaries=(0.5, 1, 2, 3, 5, 10, 20, 60, 120, 300, 900),
    ),
    "never_trained": Spec(
        "gauge",
        "streamtune_events_never_trained",
        "Events let go from the carry of rejected rounds: never trained on (dead letters apart).",
    ),
    "live_trial": Spec(
        "gauge",
        "streamtune_live_trial_impressions",
        "The running live trial's settled impressions by outcome (a_won, b_won, tie); 0 when no "
        "trial runs (rollout.live).",
        ("outcome",),
    ),
    "live_clicks": Spec(
        "gauge",
        "streamtune_live_trial_clicks",
        "The running live trial's clicks credited to each team's items (a, b) in its settled "
        "impressions; 0 when no trial runs.",
        ("team",),
    ),
    "live_log_lr": Spec(
        "gauge",
        "streamtune_live_trial_log_lr",
        "The running live trial's log mixture likelihood ratio (it decides at log(1/alpha)).",
    ),
    "paused": Spec(
        "gauge",
        "streamtune_promotions_paused",
        "1 while a guard rollback holds new champions back (rollout.pause_s), else 0.",
    ),
    "restarts": Spec(
        "counter",
        "streamtune_component_restarts",
        "Restarts of a component of `streamtune up` after it died.",
        ("component",),
    ),
}


_MAX_GAUGE_SERIES = 200
# Counter series exported at 0 before their first increment: Ray creates a series at its first
# increment, and Prometheus' increase() needs a sample before it, so without these the first
# rollback, the first restart of a component and the first rejected round raise no alert and
# show on no panel (tests/services/test_prometheus_live.py saw it).
_KNOWN_LABELS: dict[str, tuple[str, tuple[str, ...]]] = {
    "rollouts": ("kind", ("rollout", "rollback")),
    "decisions": ("decision", ("promote", "reject")),
}


def exported_names() -> set[str]:
    """Every Prometheus series name streamtune emits (``ray_streamtune_*``)."""
    return {n for spec in SPECS.values() for n in spec.exported}


class StreamMetrics:
    """All streamtune instruments, created lazily inside a Ray process."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        # Dead letters arrive as running totals per Ingestor; the counter needs deltas. The stats
        # object is held so its id stays unique while a restarted ingest has a new one.
        self._dead_seen: dict[int, tuple[IngestStats, dict[str, int]]] = {}
        self._gauges: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        self._zeros: set[tuple[str, str, str]] = {
            (name, tag, v) for name, (tag, values) in _KNOWN_LABELS.items() for v in values
        }

    @cached_property
    def _m(self) -> dict[str, Any]:
        from ray.util.metrics import Counter, Gauge, Histogram

        out: dict[str, Any] = {}
        for key, s in SPECS.items():
            if s.kind == "counter":
                out[key] = Counter(s.name, s.description, s.tags)
            elif s.kind == "gauge":
                out[key] = Gauge(s.name, s.description, s.tags)
            else:
                out[key] = Histogram(s.name, s.description, list(s.boundaries), s.tags)
        return out

    # -- ingest -------------------------------------------------------------------------
    def on_flush(self, seg: Segment, stats: IngestStats, member: str = "") -> None:
        m = self._m
        m["ingested"].inc(seg.rows, tags={"member": member})
        m["segments"].inc()
        with self._lock:
            _, seen = self._dead_seen.setdefault(id(stats), (stats, {}))
            delta = {r: n - seen.get(r, 0) for r, n in stats.dead_lettered.items()}
            seen.update(stats.dead_lettered)
        self.dead_letters(delta)

    def dead_letters(self, by_reason: dict[str, int]) -> None:
        for reason, n in by_reason.items():
            if n > 0:
                self._m["dead"].inc(n, tags={"reason": reason})

    # -- rounds -------------------------------------------------------------------------
    def on_round(
        self, result: Any, seconds: float, champion: int | None,
        phases: dict[str, float] | None = None,
    ) -> None:  # fmt: skip
        """A finished round (``training.round.RoundResult``) and its parts' seconds."""
        self.observe("round_s", seconds)
        for phase, s in (phases or {}).items():
            self.observe("phase_s", s, tags={"phase": phase})
        self.count("decisions", tags={"decision": "promote" if result.promoted else "reject"})
        if champion is not None:
            self.gauge("champion", float(champion))
        for key in ("cand_new_ndcg10", "cand_replay_ndcg10"):
            if key in result.metrics:
                self.gauge("ndcg", result.metrics[key],
                           tags={"version": str(result.version), "set": key})  # fmt: skip
        rate = result.metrics.get("train_samples_per_s")
        if rate is not None:
            self.gauge("samples_s", float(rate))

    # -- serving ------------------------------------------------------------------------
    def on_rollout(self, event: Any) -> None:
        """A ``serving.rollout.RolloutEvent`` (``kind``: rollout or rollback)."""
        self.count("rollouts", tags={"kind": str(event.kind)})

    def freshness(self, data_max_ts_ms: int | None, now: float | None = None) -> float | None:
        """Seconds between now and the newest event the serving model trained on."""
        if data_max_ts_ms is None:
            return None
        age = max(0.0, (time.time() if now is None else now) - data_max_ts_ms / 1000.0)
        self.gauge("freshness_s", age)
        return age

    def on_live(self, spans: list[dict[str, Any]], at: float) -> None:
        """A version went live at ``at``: freshness of the events it first trained on."""
        from services.freshness import Span, freshness_samples

        for seconds, _ in freshness_samples(
            [Span.model_validate(s) for s in spans], int(at * 1000)
        ):
            self.observe("event_freshness_s", max(0.0, seconds))

    def restart(self, component: str, error: BaseException | None = None) -> None:
        self.count("restarts", tags={"component": component})

    def components(self, names: Iterable[str]) -> None:
        """The supervised components: their restart series start at 0 (see ``_KNOWN_LABELS``)."""
        with self._lock:
            self._zeros.update(("restarts", "component", n) for n in names)

    # -- generic ------------------------------------------------------------------------
    def gauge(self, name: str, value: float, tags: dict[str, str] | None = None) -> None:
        key = (name, tuple(sorted((tags or {}).items())))
        with self._lock:
            self._gauges[key] = value
            if name == "ndcg" and len(self._gauges) > _MAX_GAUGE_SERIES:
                # Old versions' NDCG series go; the newest stay charted.
                ndcg = [k for k in self._gauges if k[0] == "ndcg"]
                for k in ndcg[: len(ndcg) // 2]:
                    del self._gauges[k]
        self._m[name].set(value, tags=tags)

    def refresh(self) -> None:
        """Set every gauge to its last value again, and export the known counter series at 0.

        Ray's metrics agent drops a gauge series that was not reported for two export intervals
        (ray 2.60's OpenTelemetry recorder), so a value set once (NDCG of a version, the latest
        round's samples/s) must be re-set periodically to stay on the dashboard.
        """
        with self._lock:
            items = list(self._gauges.items())
            zeros = sorted(self._zeros)
        for (name, tags), value in items:
            self._m[name].set(value, tags=dict(tags) or None)
        for name, tag, v in zeros:
            # Adding 0 to a counter creates its series and changes no value. ``inc`` refuses 0;
            # ``_record`` is what it calls after that check (ray.util.metrics, Ray 2.60).
            self._m[name]._record(0, tags={tag: v})

    def count(self, name: str, n: float = 1.0, tags: dict[str, str] | None = None) -> None:
        self._m[name].inc(n, tags=tags)

    def observe(self, name: str, value: float, tags: dict[str, str] | None = None) -> None:
        self._m[name].observe(value, tags=tags)
