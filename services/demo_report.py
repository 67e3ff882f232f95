"""What `streamtune demo` reports: per slice of the replay, the loop's rounds, the quality of the
champion of the time beside the never-updated v1, and how fresh the served model was.

The accounting is ``services.freshness``'s (the loop's records say which version first trained on
which offsets); this module only turns it into rows, a summary, a table and a plot.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import matplotlib
import numpy as np

matplotlib.use("Agg")  # headless; must precede pyplot's import
import matplotlib.pyplot as plt
from rich.console import Console
from rich.table import Table

from services.demo_live import live_record
from services.freshness import Ledger
from serving.live_trial import figures
from streams.progress import working

if TYPE_CHECKING:
    import pyarrow as pa

    from services.demo import DemoConfig
    from services.demo_replay import Clock, Queries, StreamWatch
    from services.running import Running
    from streams.events import Event
    from training.registry import LiveTrial, LoadedVersion

console = Console()


@dataclass
class Row:
    """One slice of the replay after the backlog: replay indices ``[start, end)``."""

    start: int
    end: int
    champion: int | None = None  # the champion when the slice's first event was published
    rounds: int = 0  # versions registered while the slice was being published
    promoted: int = 0
    rejected: int = 0
    consolidation: int = 0  # of those rounds, consolidation rounds (training/round.py)
    ndcg_champion: float | None = None  # that champion, test-then-train on the slice's events
    ndcg_static: float | None = None  # the never-updated first promoted version, same events
    gap: float | None = None  # champion - static v1, paired over the questions both were asked
    gap_se: float | None = None  # its standard error, clustered by user
    verdict: str | None = None  # "ahead", "behind" or "within noise" at 95%
    freshness_median_s: float | None = None
    freshness_events: int = 0  # events whose freshness was measured
    never_trained: int = 0  # let go from the carry: never trained on, by rule
    pending: int = 0  # trained by no promoted version by the end

    @property
    def scored(self) -> bool:
        return self.ndcg_champion is not None and self.ndcg_static is not None


@dataclass
class Fates:
    """What became of each replayed event, by replay index (the backlog's are left empty)."""

    fresh_s: list[float | None]  # publish -> first live answer by a version trained on it
    never_trained: list[bool]
    pending: list[bool]


def report(
    running: Running,
    cfg: DemoConfig,
    events: list[Event],
    clock: Clock,
    watch: StreamWatch,
    queries: Queries,
    wall_s: float,
) -> dict[str, Any]:
    """Account for every event, score every slice, print the table, write the JSON and plot."""
    first = cfg.first_round_events
    buffered = running.buffer.read()
    places, index = places_of(buffered, events)
    records = running.loop.state()["rounds"]
    ledger = ledger_of(records)
    fates = account(ledger, places, clock.published, dict(queries.first_seen), first)
    rows = [Row(a, b, champion=watch.starts.get(a)) for a, b in watch.bounds]
    ends = [clock.published(b) if b < len(events) else watch.ended for _, b in watch.bounds]
    windows = [(clock.published(a), end) for (a, _), end in zip(watch.bounds, ends, strict=True)]
    fill_rows(rows, fates, registered_at(records), windows)
    with working("scoring each slice's champion and the static v1"):
        score_rows(rows, buffered, index, watch.models, watch.static, cfg.eval_cases)
    Console(width=max(console.width, 160)).print(table(rows))  # 12 columns
    served = {"queries_ok": queries.ok, "queries_failed": queries.failed,
              "versions_served": sorted(queries.first_seen)}  # fmt: skip
    record = summary(rows, fates, first, ledger, watch.static_version, served, wall_s)
    trial = running.registry.rollout_state().trial  # read once: the record and the lines agree
    record["live"] = live_record(running.registry, cfg.live, queries.clicks, trial)
    record["live"]["interleaved_answers"] = queries.interleaved
    say_live(record["live"], trial)
    cfg.out.mkdir(parents=True, exist_ok=True)
    record["plot"] = str(plot(rows, cfg.out / "demo_quality.png"))
    (cfg.out / "demo.json").write_text(json.dumps(record, indent=2))
    fresh = record["freshness_median_s"]
    console.print(
        f"{record['rounds']} rounds ({record['promoted']} promoted, {record['rejected']} "
        f"rejected); freshness p50 {'-' if fresh is None else f'{fresh:.1f} s'}; "
        f"{record['never_trained']:,} events never trained, {record['pending']:,} pending"
    )
    if record["compared_slices"]:
        console.print(
            f"NDCG@10 on the next slice: champion {record['updated_ndcg10_next']} against "
            f"static v1 {record['static_ndcg10_next']}; ahead on {record['slices_ahead']} of "
            f"{record['compared_slices']} slices; beyond the noise (95%): ahead on "
            f"{record['slices_ahead_95']}, behind on {record['slices_behind_95']}"
        )
    console.print(f"plot: {record['plot']}")
    return record


def say_live(live: Mapping[str, Any], trial: LiveTrial | None) -> None:
    """The live trials in a few lines: each decision, and the trial still running (in the
    words of its decisions, ``serving.live_trial.figures``)."""
    if live["mode"] == "off":
        return
    console.print(
        f"live trials ({live['mode']}): {live['interleaved_answers']:,} interleaved answers, "
        f"{live['clicks_sent'] or 0:,} simulated clicks sent; {len(live['decisions'])} decided"
    )
    for d in live["decisions"]:
        console.print(f"  v{d['version']} {d['decision']}: {d['reason']}")
    if trial is not None:
        console.print(f"  running: trial {trial.id}, {figures(trial)} ({trial.test.decision})")


def places_of(buffered: pa.Table, events: list[Event]) -> tuple[list[tuple[str, int] | None], Any]:
    """Each replayed event's ``(tp, offset)`` in the buffer, and each buffered row's replay index
    (-1: not one of the replay's events)."""
    from streams.offsets import tp_key

    at = {e.event_id: i for i, e in enumerate(events)}
    places: list[tuple[str, int] | None] = [None] * len(events)
    index = np.full(buffered.num_rows, -1, dtype=np.int64)
    cols = (buffered.column(c).to_pylist() for c in ("event_id", "topic", "partition", "offset"))
    for j, (eid, topic, part, off) in enumerate(zip(*cols, strict=True)):
        i = at.get(eid)
        if i is not None:
            places[i], index[j] = (tp_key(topic, part), off), i
    return places, index


def score_rows(
    rows: list[Row],
    buffered: pa.Table,
    index: Any,
    models: Mapping[int, LoadedVersion | None],
    static: LoadedVersion | None,
    cases: int,
) -> None:
    """Test-then-train: each slice's champion and the static v1 on the slice's events, given
    every event buffered before the slice; and the champion's lead, paired question by question
    with its 95% verdict (a slice of a few hundred users makes NDCG@10 noisy, so a lead or a lag
    smaller than about two standard errors says nothing)."""
    import pyarrow as pa

    from training.data import next_slice_holdout
    from training.metrics import holdout_ranks, ndcg_hr, paired_gap

    for k, r in enumerate(rows):
        champion = models.get(r.champion) if r.champion is not None else None
        if champion is None or static is None:
            continue
        before = buffered.filter(pa.array((index >= 0) & (index < r.start)))
        new = buffered.filter(pa.array((index >= r.start) & (index < r.end)))
        c_hold, s_hold = (
            next_slice_holdout(before, new, lv.vocab, lv.model.cfg.max_len, cases, seed=k)
            for lv in (champion, static)
        )
        if not len(c_hold) or not len(s_hold):
            continue
        c_ranks = holdout_ranks(champion.model, c_hold)
        s_ranks = holdout_ranks(static.model, s_hold)
        r.ndcg_champion, r.ndcg_static = float(ndcg_hr(c_ranks)[0]), float(ndcg_hr(s_ranks)[0])
        if champion.version == static.version:  # v1 against itself: no lead
            continue
        gap = paired_gap(s_ranks, s_hold, c_ranks, c_hold)
        if gap.questions:
            r.gap, r.gap_se, r.verdict = gap.mean, gap.se, gap.verdict()


def ledger_of(records: list[dict[str, Any]]) -> Ledger:
    """The loop's round records as a Ledger. A record without spans (written before rounds named
    them) counts a promoted round as the first to train on its own slice."""

    def spans(rec: dict[str, Any]) -> dict[str, Any]:
        if "trained" in rec or not rec.get("promoted"):
            return rec
        own = {"after": rec.get("after_watermark", {}), "upto": rec.get("watermark", {})}
        return {**rec, "trained": [own]}

    return Ledger(spans(r) for r in records)


def registered_at(records: list[dict[str, Any]]) -> list[tuple[float, bool, bool]]:
    """Each round's registration (wall time, promoted, a consolidation round): the loop, in
    this process, stamps its rounds on the monotonic clock."""
    to_wall = time.time() - time.monotonic()
    return [
        (
            float(r["started"]) + float(r["seconds"]) + to_wall,
            bool(r.get("promoted")),
            r.get("kind") == "consolidation",
        )
        for r in records
        if "started" in r and "seconds" in r
    ]


def slice_bounds(first: int, total: int, size: int) -> list[tuple[int, int]]:
    """Each row's replay indices after a backlog of ``first``; a tail under half a slice joins
    the row before it, since so few questions would make its NDCG mostly noise."""
    bounds = [(a, min(a + size, total)) for a in range(first, total, size)]
    if len(bounds) > 1 and bounds[-1][1] - bounds[-1][0] < size // 2:
        bounds.pop()
        bounds[-1] = (bounds[-1][0], total)
    return bounds


def account(
    ledger: Ledger,
    places: Sequence[tuple[str, int] | None],
    published: Callable[[int], float],
    first_seen: Mapping[int, float],
    first: int,
) -> Fates:
    """Fates of events ``first..`` (``places[i]``: the buffer's ``(tp, offset)`` of event i)."""
    n = len(places)
    fates = Fates([None] * n, [False] * n, [False] * n)
    live = {v: ledger.live_at(v, first_seen) for v in ledger.promoted}
    for i in range(first, n):
        place = places[i]
        if place is None:  # not (yet) in the buffer: nobody can have trained on it
            fates.pending[i] = True
            continue
        version = ledger.first_trained_by(*place)
        if version is None:
            if ledger.dropped(*place):
                fates.never_trained[i] = True
            else:
                fates.pending[i] = True
            continue
        at = live.get(version)
        if at is not None:  # else: trained, but no version descended from it answered yet
            fates.fresh_s[i] = at - published(i)
    return fates


def fill_rows(
    rows: list[Row],
    fates: Fates,
    registered: Sequence[tuple[float, bool, bool]],
    windows: Sequence[tuple[float, float]],
) -> None:
    """Per row: its events' fates, and the rounds registered (wall time, promoted, consolidation)
    while it was being published: within ``windows[k]`` (wall times, end excluded)."""
    for k, r in enumerate(rows):
        fresh = [f for f in fates.fresh_s[r.start : r.end] if f is not None]
        r.freshness_events = len(fresh)
        r.freshness_median_s = float(np.median(fresh)) if fresh else None
        r.never_trained = sum(fates.never_trained[r.start : r.end])
        r.pending = sum(fates.pending[r.start : r.end])
        t0, t1 = windows[k]
        during = [(promoted, c) for at, promoted, c in registered if t0 <= at < t1]
        r.rounds, r.promoted = len(during), sum(p for p, _ in during)
        r.rejected = r.rounds - r.promoted
        r.consolidation = sum(c for _, c in during)


def _lead(r: Row) -> str:
    if r.gap is None or r.gap_se is None:
        return "-"
    from training.metrics import Z95

    return f"{r.gap:+.4f} ±{Z95 * r.gap_se:.4f} {r.verdict}"


def _f(x: float | None, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def table(rows: list[Row]) -> Table:
    t = Table(title="streamtune demo: one row per slice of the replay")
    for col in ("slice (events)", "rounds", "promoted", "rejected", "consolidating", "champion",
                "NDCG@10 champion", "NDCG@10 static v1", "lead (95%)", "freshness p50 s",
                "never trained", "pending"):  # fmt: skip
        t.add_column(col, justify="right")
    for r in rows:
        t.add_row(
            f"{r.start:,}-{r.end:,}", str(r.rounds), str(r.promoted), str(r.rejected),
            str(r.consolidation),
            "-" if r.champion is None else f"v{r.champion}", _f(r.ndcg_champion, ".4f"),
            _f(r.ndcg_static, ".4f"), _lead(r), _f(r.freshness_median_s, ".1f"),
            f"{r.never_trained:,}", f"{r.pending:,}",
        )  # fmt: skip
    t.caption = (
        "rounds: versions registered while the slice was published (consolidating: of those, "
        "consolidation rounds, a large replay sample for more epochs). NDCG@10: the champion at "
        "the moment the slice's first event was published, test-then-train on the slice's events "
        "(it cannot have trained on them), beside the first promoted version, never updated. "
        "lead: champion - static v1 over the questions both were asked, +- 1.96 standard errors "
        "(clustered by user), and whether that interval lies above 0, below it, or across it. "
        "freshness: event published -> first live /recommend answer by the version that first "
        "trained on it or a later promoted one. never trained: let go from the carry; pending: "
        "trained by no promoted version by the end."
    )
    return t


def summary(
    rows: list[Row],
    fates: Fates,
    first: int,
    ledger: Ledger,
    static_version: int | None,
    queries: Mapping[str, Any],
    wall_s: float,
) -> dict[str, Any]:
    """The record written to ``demo.json``; event counts cover the events after the backlog.

    Quality compares the slices whose champion was an updated version: where v1 itself was the
    champion, both columns score the same model.
    """
    fresh = [f for f in fates.fresh_s[first:] if f is not None]
    scored = [r for r in rows if r.scored and r.champion != static_version]
    promoted = sum(r.promoted for r in ledger.rounds)
    ahead = sum((r.ndcg_champion or 0.0) > (r.ndcg_static or 0.0) for r in scored)
    return {
        "bench": "demo",
        "events": len(fates.fresh_s),
        "backlog_events": first,
        "freshness_median_s": _pct(fresh, 50),
        "freshness_p99_s": _pct(fresh, 99),
        "freshness_events": len(fresh),
        "updated_ndcg10_next": _mean([r.ndcg_champion for r in scored]),
        "static_ndcg10_next": _mean([r.ndcg_static for r in scored]),
        "ahead_of_static_every_slice": bool(scored) and ahead == len(scored),
        "compared_slices": len(scored),
        "slices_ahead": ahead,
        # The same slices read at 95% (paired, clustered by user): how many leads and lags are
        # larger than the noise of a slice's questions.
        "slices_ahead_95": sum(r.verdict == "ahead" for r in scored),
        "slices_behind_95": sum(r.verdict == "behind" for r in scored),
        "static_version": static_version,
        "rounds": len(ledger.rounds),
        "promoted": promoted,
        "rejected": len(ledger.rounds) - promoted,
        "consolidation_rounds": sum(r.consolidation for r in rows),  # registered during rows
        "never_trained": sum(fates.never_trained[first:]),
        "pending": sum(fates.pending[first:]),
        **queries,
        "wall_s": round(wall_s, 1),
        "per_row": [asdict(r) for r in rows],
    }


def _pct(xs: list[float], q: float) -> float | None:
    return round(float(np.percentile(xs, q)), 2) if xs else None


def _mean(xs: Sequence[float | None]) -> float | None:
    vals = [x for x in xs if x is not None]
    return round(sum(vals) / len(vals), 4) if vals else None


def plot(rows: list[Row], path: Path) -> Path:
    """NDCG@10 per slice: the champion of the time against the never-updated v1."""
    scored = [(r.end, r.ndcg_champion, r.ndcg_static) for r in rows if r.scored]
    x = [end for end, _, _ in scored]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(x, [c or 0.0 for _, c, _ in scored], marker="o", label="champion at slice start")
    ax.plot(x, [v1 or 0.0 for _, _, v1 in scored], marker="s", label="static v1 (never updated)")
    ax.set(xlabel="events published (end of the slice)", ylabel="NDCG@10 on the slice",
           title="streamtune demo: quality over time (test-then-train)")  # fmt: skip
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
