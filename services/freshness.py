"""Which version first trained each event, and how fresh that made the served model.

One accounting for the loop's status, the demo and ``bench.freshness``. Every round's record (the
loop's state file, one entry per registered version, kept however many versions the registry
keeps) names the offset spans whose events its version trained on for the first time:

- a promoted round: its own slice, plus the slices of the rejected rounds it carried forward
  (their training examples, trained again: see ``training.carry``);
- a rejected round: none (its slice waits in the carry for the next round);
- ``dropped`` spans: slices the carry let go (``replay.carry_max_examples``), never trained on by
  rule, counted apart.

An event's *model freshness* is the first live answer from the version that first trained on it,
or from any later promoted version (each warm-starts from the champion of its time, so every
later promoted version descends from it), minus the event's publish time.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class Span(BaseModel):
    """Offsets ``[after, upto)`` per ``topic:partition``, and what they held."""

    model_config = ConfigDict(extra="ignore")

    after: dict[str, int] = Field(default_factory=dict, description="First offset, per partition.")
    upto: dict[str, int] = Field(default_factory=dict, description="End offset, per partition.")
    events: int = Field(default=0, ge=0, description="Buffered records in the span.")
    ts_q: list[int] = Field(
        default_factory=list,
        description="Event-time quantiles (ms; 0%, 5%, ..., 100%) of the span's events.",
    )

    def holds(self, tp: str, offset: int) -> bool:
        return self.after.get(tp, 0) <= offset < self.upto.get(tp, 0)


class RoundSpans(BaseModel):
    """The accounting part of one round's record."""

    model_config = ConfigDict(extra="ignore")

    version: int
    promoted: bool
    trained: list[Span] = Field(default_factory=list, description="First trained by this version.")
    dropped: list[Span] = Field(default_factory=list, description="Let go from the carry.")


class Ledger:
    """The rounds' spans in registration order, looked up per event."""

    def __init__(self, records: Iterable[Mapping[str, Any]]) -> None:
        self.rounds = [RoundSpans.model_validate(r) for r in records if "version" in r]
        self.promoted = sorted(r.version for r in self.rounds if r.promoted)

    def first_trained_by(self, tp: str, offset: int) -> int | None:
        """The promoted version that first trained on the event at ``(tp, offset)``, if any."""
        for r in self.rounds:
            if r.promoted and any(s.holds(tp, offset) for s in r.trained):
                return r.version
        return None

    def dropped(self, tp: str, offset: int) -> bool:
        return any(s.holds(tp, offset) for r in self.rounds for s in r.dropped)

    def live_at(self, version: int, first_seen: Mapping[int, float]) -> float | None:
        """First live answer from ``version`` or a later promoted version (its descendants)."""
        return min(
            (t for v, t in first_seen.items() if v >= version and v in self.promoted), default=None
        )

    def never_trained_events(self) -> int:
        """Events the carry let go: never trained on, by rule (dead letters are not counted)."""
        return sum(s.events for r in self.rounds for s in r.dropped)


def freshness_samples(spans: Iterable[Span], live_at_ms: int) -> list[tuple[float, int]]:
    """(seconds, weight) pairs: each span's quantile points, weighted by its events."""
    out: list[tuple[float, int]] = []
    for s in spans:
        if not s.ts_q or s.events <= 0:
            continue
        w = max(1, s.events // len(s.ts_q))
        out.extend(((live_at_ms - t) / 1000.0, w) for t in s.ts_q)
    return out


def weighted_percentile(samples: list[tuple[float, int]], q: float) -> float | None:
    """The ``q``-th percentile (0-100) of weighted samples; None if there are none."""
    if not samples:
        return None
    ordered = sorted(samples)
    total = sum(w for _, w in ordered)
    at = q / 100.0 * total
    run = 0
    for x, w in ordered:
        run += w
        if run >= at:
            return x
    return ordered[-1][0]


def live_freshness(
    records: Iterable[Mapping[str, Any]],
    live: Iterable[tuple[int, float]],
    window_s: float,
    now: float,
) -> dict[str, Any]:
    """Model freshness of the events that went live in the last ``window_s`` seconds.

    ``records``: the loop's round records; ``live``: (version, Unix time) of rollouts. Freshness
    is measured from each event's own timestamp (``ts``, set by its producer) to the rollout of
    the first version that served a model trained on it, from 21 quantiles per round.
    """
    ledger = Ledger(records)
    went_live = sorted((t, v) for v, t in live)
    samples: list[tuple[float, int]] = []
    for r in ledger.rounds:
        if not r.promoted:
            continue
        at = next((t for t, v in went_live if v >= r.version), None)  # it, or a later one
        if at is not None and now - at <= window_s:
            samples.extend(freshness_samples(r.trained, int(at * 1000)))
    return {
        "p50_s": weighted_percentile(samples, 50),
        "p99_s": weighted_percentile(samples, 99),
        "events": sum(w for _, w in samples) if samples else 0,
        "window_s": window_s,
    }
