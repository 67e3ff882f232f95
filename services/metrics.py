"""Metrics on the Ray dashboard: ``ray.util.metrics`` instruments for every stage of the loop.

Ray exports them through its metrics agent, so they appear in the dashboard's metrics view and are
scrapeable by Prometheus as ``ray_streamtune_*`` (deploy/grafana/streamtune.json charts them).
Instruments only work inside a Ray process (driver or actor); ``StreamMetrics`` is created there.
"""

from __future__ import annotations

from functools import cached_property

from streams.buffer import Segment
from streams.ingest import IngestStats


class StreamMetrics:
    """All streamtune instruments; names are the Prometheus names less the ``ray_`` prefix."""

    @cached_property
    def _m(self) -> dict[str, object]:
        from ray.util.metrics import Counter, Gauge, Histogram

        return {
            "ingested": Counter(
                "streamtune_ingested_events", "Events appended to the buffer.", ("member",)
            ),
            "dead": Counter(
                "streamtune_dead_lettered_events", "Records sent to the DLQ.", ("reason",)
            ),
            "segments": Counter("streamtune_buffer_segments_written", "Segments written."),
            "buffer_rows": Gauge("streamtune_buffer_rows", "Rows in the buffer."),
            "lag": Gauge("streamtune_consumer_lag", "Records in Kafka not yet in the buffer."),
            "round_s": Histogram(
                "streamtune_round_seconds",
                "Wall time of a training round.",
                boundaries=[5, 10, 20, 40, 80, 160, 320, 640],
            ),
            "samples_s": Gauge("streamtune_train_samples_per_second", "Training throughput."),
            "ndcg": Gauge("streamtune_eval_ndcg10", "NDCG@10 of a version.", ("version", "set")),
            "champion": Gauge("streamtune_champion_version", "Current champion version."),
            "decisions": Counter(
                "streamtune_gate_decisions", "Promote/reject decisions.", ("decision",)
            ),
            "rollouts": Counter("streamtune_rollouts", "Serve rollouts.", ("kind",)),
            "freshness_s": Gauge(
                "streamtune_model_freshness_seconds",
                "Age of the newest event the serving model was trained on.",
            ),
        }

    def on_flush(self, seg: Segment, stats: IngestStats, member: str = "") -> None:
        m = self._m
        m["ingested"].inc(seg.rows, tags={"member": member})  # type: ignore[attr-defined]
        m["segments"].inc()  # type: ignore[attr-defined]

    def dead_letters(self, by_reason: dict[str, int]) -> None:
        for reason, n in by_reason.items():
            if n:
                self._m["dead"].inc(n, tags={"reason": reason})  # type: ignore[attr-defined]

    def gauge(self, name: str, value: float, tags: dict[str, str] | None = None) -> None:
        self._m[name].set(value, tags=tags)  # type: ignore[attr-defined]

    def count(self, name: str, n: float = 1.0, tags: dict[str, str] | None = None) -> None:
        self._m[name].inc(n, tags=tags)  # type: ignore[attr-defined]

    def observe(self, name: str, value: float) -> None:
        self._m[name].observe(value)  # type: ignore[attr-defined]
