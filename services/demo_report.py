"""What `streamtune demo` prints and writes: the per-round table, the summary and the plot."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import matplotlib

matplotlib.use("Agg")  # headless; must precede pyplot's import
import matplotlib.pyplot as plt
from rich.table import Table

if TYPE_CHECKING:
    from services.demo import Queries, Row


def _f(x: float | None, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def freshness(r: Row) -> float | None:
    """Seconds from publishing the newest event a version covers to a live answer from it."""
    return None if r.served_at is None else r.served_at - r.newest_published


def table(rows: list[Row]) -> Table:
    t = Table(title="streamtune demo: one row per training round")
    for col in ("version", "new events", "covered", "NDCG@10 next slice", "static v1",
                "decision", "rollout s", "freshness s"):  # fmt: skip
        t.add_column(col, justify="right")
    for r in rows:
        decision = r.decision if r.decision == "promote" else f"{r.decision}: {r.reason[:40]}"
        t.add_row(
            f"v{r.version}", f"{r.new_events:,}", f"{r.covered:,}", _f(r.ndcg_next, ".4f"),
            _f(r.ndcg_static, ".4f"), decision, _f(r.rollout_s, ".1f"), _f(freshness(r), ".0f"),
        )  # fmt: skip
    t.caption = (
        "NDCG@10 next slice: the version, test-then-train, on the events that arrived after it "
        "(none trained on them yet); static v1: the first version, never updated, on the same "
        "events; freshness: newest covered event published -> first live answer by the version."
    )
    return t


def summary(rows: list[Row], queries: Queries, wall_s: float, events: int) -> dict[str, Any]:
    scored = [r for r in rows if r.ndcg_next is not None and r.ndcg_static is not None]
    fresh = [f for r in rows if (f := freshness(r)) is not None]
    mean = lambda xs: round(sum(xs) / len(xs), 4) if xs else None  # noqa: E731
    return {
        "bench": "demo",
        "events": events,
        "rounds": len(rows),
        "promoted": sum(r.decision == "promote" for r in rows),
        "updated_ndcg10_next": mean([r.ndcg_next for r in scored if r.ndcg_next is not None]),
        "static_ndcg10_next": mean([r.ndcg_static for r in scored if r.ndcg_static is not None]),
        "freshness_s": [round(f, 1) for f in fresh],
        "queries_ok": queries.ok,
        "queries_failed": queries.failed,
        "versions_served": sorted(queries.first_seen),
        "wall_s": round(wall_s, 1),
        "per_round": [_round_record(r) for r in rows],
    }


def _round_record(r: Row) -> dict[str, Any]:
    return {
        "version": r.version,
        "decision": r.decision,
        "new_events": r.new_events,
        "ndcg10_next": r.ndcg_next,
        "static_ndcg10_next": r.ndcg_static,
        "rollout_s": r.rollout_s,
        "freshness_s": freshness(r),
    }


def plot(rows: list[Row], path: Path) -> Path:
    """NDCG@10 on each next slice: the updated champion against the never-updated v1."""
    scored = [r for r in rows if r.ndcg_next is not None and r.ndcg_static is not None]
    fig, ax = plt.subplots(figsize=(7, 4))
    x = [r.covered for r in scored]
    ax.plot(
        x, [r.ndcg_next or 0.0 for r in scored], marker="o", label="continually updated champion"
    )
    ax.plot(
        x, [r.ndcg_static or 0.0 for r in scored], marker="s", label="static v1 (never updated)"
    )
    ax.set(xlabel="events trained on by the serving version", ylabel="NDCG@10 on the next slice",
           title="streamtune demo: quality over time (test-then-train)")  # fmt: skip
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
