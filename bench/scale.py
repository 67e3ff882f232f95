"""Scale: live state at 10k and 1M users, training by catalog size, the whole footprint.

    python -m bench.scale                         # state at 10k and 1M users; catalog 10k/100k/1M
    python -m bench.scale --quick                 # state at 10k and 100k users; catalog 10k/100k
    python -m bench.scale --part state --users 10000 1000000 --shards 2

**state** (one fresh process per user count): synthetic users (``--events-per-user`` events each,
items Zipf-popular over ``--state-items``) written straight into a buffer, not through Kafka (at 1M
users x 100 events the broker would take longer than everything measured), and a registry version
whose per-user history index holds every event but the last ``--tail`` ones, as rounds over those
events leave it. Then a local Ray, a real Kafka broker for the shards' live tail, and the history
shards (``serving.history_shards``) started as ``up`` starts them: each rebuilds its users from the
index plus the buffer's tail. Reported: each shard's rebuild seconds, the wall time until every
shard answers, the shards' RSS (bytes per user = its growth between the smallest and largest user
count, over the users added), the RSS of every process the run started (Kafka's JVM, Ray's own,
shards, replicas), and ``/recommend`` p50/p99 at concurrency 1 and 8 through Serve (the default
ingress) for users drawn from the whole population, with the model over ``--state-items`` items.

**catalog** (one fresh process per size): a registry champion over a catalog of N items (vocab and
item table of N rows, as rounds over such a catalog leave them), then ``--round-events`` new
events over that catalog and one real round through the loop (plan, Ray task, Ray Train +
DeepSpeed, gate, registry) with the product's round settings (``model.loss: auto`` picks the
sampled softmax above its threshold, and the sampled loss trains the item table row-wise).
Reported: training samples/s (measured inside the training loop, so Ray Train's start-up is
excluded), the round's wall time and its training seconds; then the same round over the largest
catalog with the item table trained dense (``trainer.row_wise_table=False``), for reference.

Goals (issue "internet scale"): <= 1 KB of live state per user at 1M users x 100; all shards rebuilt
in <= 60 s; /recommend p99 at concurrency 8 at 1M users <= 1.5x that at 10k users; training
samples/s at 1M items >= 1/3 of that at 10k items. Offline NDCG@10 of sampled vs full softmax is
``python -m bench.sampled_loss``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from typing import Any

from rich.console import Console
from rich.table import Table

from bench.scale_catalog import catalog_row
from bench.scale_state import state_row
from bench.scale_up import up_row

console = Console(stderr=True)
OUT = Console(width=160)
GIB = 2**30


def apart(fn: Callable[..., dict[str, Any]], *args: Any) -> dict[str, Any]:
    """``fn(*args)`` in a fresh spawned process: each row starts from an empty heap and Ray."""
    # Not a multiprocessing.Pool: its workers are daemonic and may not start Ray or a broker.
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


def _r(x: float | None, nd: int = 2) -> float | None:
    return None if x is None else round(x, nd)


def state_summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    small, large = rows[0], rows[-1]
    added = large["users"] - small["users"]
    per_user = (large["shard_rss"] - small["shard_rss"]) / added if added > 0 else None
    return {
        "users": [r["users"] for r in rows],
        "shards": large["shards"],
        "bytes_per_user": _r(per_user, 0),
        "rebuild_wall_s": {str(r["users"]): _r(r["rebuild_wall_s"]) for r in rows},
        "rebuild_s_per_shard": {str(r["users"]): [_r(x) for x in r["rebuild_s"]] for r in rows},
        "rebuilt_from": large["rebuilt_from"],
        "c1_p50_ms": {str(r["users"]): _r(r["c1_p50_ms"]) for r in rows},
        "c1_p99_ms": {str(r["users"]): _r(r["c1_p99_ms"]) for r in rows},
        "c8_p99_ms": {str(r["users"]): _r(r["c8_p99_ms"]) for r in rows},
        "c8_p99_ratio": _r(large["c8_p99_ms"] / small["c8_p99_ms"], 3),
        "total_rss_gib": {str(r["users"]): _r(r["total_rss"] / GIB) for r in rows},
        "errors": sum(r["errors"] for r in rows),
    }


def catalog_summary(rows: list[dict[str, Any]], dense: dict[str, Any] | None) -> dict[str, Any]:
    base = rows[0]["samples_per_s"]
    last = rows[-1]["samples_per_s"]
    return {
        "table": {str(r["items"]): r["table"] for r in rows},
        "items": [r["items"] for r in rows],
        "loss": {str(r["items"]): r["loss"] for r in rows},
        "samples_per_s": {str(r["items"]): _r(r["samples_per_s"], 0) for r in rows},
        "round_s": {str(r["items"]): _r(r["round_s"], 1) for r in rows},
        "train_s": {str(r["items"]): _r(r["train_s"], 1) for r in rows},
        "samples_ratio_largest": _r(last / base, 3) if base and last else None,
        "dense_reference": None if dense is None else {
            "items": dense["items"], "samples_per_s": _r(dense["samples_per_s"], 0),
            "train_s": _r(dense["train_s"], 1), "round_s": _r(dense["round_s"], 1),
        },
    }  # fmt: skip


def show_state(rows: list[dict[str, Any]]) -> None:
    t = Table(title="live state by users (history shards, /recommend through Serve)")
    for col in ("users", "shards", "rebuild wall s", "per shard s", "shard RSS GiB",
                "all RSS GiB", "c1 p50/p99 ms", "c8 p50/p99 ms", "non-2xx"):  # fmt: skip
        t.add_column(col, justify="right")
    for r in rows:
        t.add_row(f"{r['users']:,}", str(r["shards"]), f"{r['rebuild_wall_s']:.1f}",
                  " ".join(f"{x:.1f}" for x in r["rebuild_s"]), f"{r['shard_rss'] / GIB:.2f}",
                  f"{r['total_rss'] / GIB:.2f}", f"{r['c1_p50_ms']:.1f}/{r['c1_p99_ms']:.1f}",
                  f"{r['c8_p50_ms']:.1f}/{r['c8_p99_ms']:.1f}", str(r["errors"]))  # fmt: skip
    OUT.print(t)
    OUT.print(f"rebuilt from: {rows[-1]['rebuilt_from']}")


def show_catalog(rows: list[dict[str, Any]]) -> None:
    t = Table(title="one round by catalog size (training samples/s exclude Ray Train start-up)")
    for col in ("items", "loss", "item table", "events", "samples/s", "train s", "round s"):
        t.add_column(col, justify="right")
    for r in rows:
        t.add_row(f"{r['items']:,}", r["loss"], r["table"], f"{r['events']:,}",
                  f"{r['samples_per_s']:.0f}", f"{r['train_s']:.1f}",
                  f"{r['round_s']:.1f}")  # fmt: skip
    OUT.print(t)


def show_up(row: dict[str, Any], per_user: int) -> None:
    t = Table(title="streamtune up: memory by kind of process, while serving")
    for col in ("process", "count", "RSS GiB", "PSS GiB"):
        t.add_column(col, justify="right")
    for name, r in sorted(row["roles"].items(), key=lambda kv: -kv[1]["rss"]):
        t.add_row(name, str(r["n"]), f"{r['rss'] / GIB:.2f}", f"{r['pss'] / GIB:.2f}")
    OUT.print(t)
    peaks = ", ".join(f"{r['process']} (pid {r['pid']}) {r['peak_rss'] / GIB:.2f}"
                      for r in row["process_peaks"])  # fmt: skip
    OUT.print(f"largest processes at their own peak RSS (GiB): {peaks}")
    cg = "no memory cgroup could be made here"
    if row["cg_peak"] is not None:
        cap = f"capped at {row['cg_limit'] / GIB:.2f} GiB" if row["cg_limit"] else "no cap"
        cg = (f"its memory cgroup ({cap}): {row['cg_resident'] / GIB:.2f} GiB mapped while "
              f"serving, each page once; peak charge {row['cg_peak'] / GIB:.2f} GiB with the "
              f"page cache; {row['cg_oom_kills']} OOM kills")  # fmt: skip
    OUT.print(f"streamtune up with {row['users']:,} users x {per_user} events, {row['items']:,} "
              f"items, {row['shards']} shards: summed RSS of every process it started "
              f"{row['steady_rss'] / GIB:.2f} GiB serving (peak {row['peak_rss'] / GIB:.2f}), "
              f"PSS {row['steady_pss'] / GIB:.2f}; {cg}; first trained version live after "
              f"{row['live_s']:.0f} s")  # fmt: skip


def up_summary(row: dict[str, Any]) -> dict[str, Any]:
    def gib(key: str) -> float | None:
        return None if row[key] is None else _r(row[key] / GIB)

    return {"users": row["users"], "items": row["items"], "shards": row["shards"],
            "steady_rss_gib": gib("steady_rss"), "peak_rss_gib": gib("peak_rss"),
            "steady_pss_gib": gib("steady_pss"), "cgroup_limit_gib": gib("cg_limit"),
            "cgroup_resident_gib": gib("cg_resident"), "cgroup_peak_gib": gib("cg_peak"),
            "cgroup_oom_kills": row["cg_oom_kills"], "live_s": _r(row["live_s"], 0),
            "process_peaks_gib": {f"{r['process']}:{r['pid']}": _r(r["peak_rss"] / GIB)
                                  for r in row["process_peaks"]},
            "fits_8_gib": None if row["cg_peak"] is None
            else bool(row["cg_oom_kills"] == 0 and row["cg_resident"] <= 8 * GIB)}  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.scale", description=__doc__.split("\n")[0])
    p.add_argument("--part", choices=["state", "catalog", "up", "all"], default="all")
    p.add_argument("--quick", action="store_true", help="10k/100k users; 10k/100k items")
    p.add_argument("--users", type=int, nargs="+", default=None, help="default 10000 1000000")
    p.add_argument("--events-per-user", type=int, default=100)
    p.add_argument("--state-items", type=int, default=10_000, help="catalog of the state part")
    p.add_argument("--tail", type=int, default=20_000, help="events after the index's watermark")
    p.add_argument("--shards", type=int, default=2, help="serving.history_shards")
    p.add_argument("--seconds", type=float, default=15.0, help="seconds per concurrency level")
    p.add_argument(
        "--items",
        type=int,
        nargs="+",
        default=None,
        help="catalog sizes (default 10000 100000 1000000)",
    )
    p.add_argument("--round-events", type=int, default=25_000)
    p.add_argument(
        "--no-dense-reference", dest="dense_reference", action="store_false",
        help="skip the reference round over the largest catalog with its item table trained "
        "dense (trainer.row_wise_table=False)",
    )  # fmt: skip
    p.add_argument("--up-users", type=int, default=1_000_000, help="the footprint part's users")
    p.add_argument("--up-items", type=int, default=100_000, help="the footprint part's catalog")
    p.add_argument(
        "--memory-limit-gib", type=float, default=8.0,
        help="the footprint part runs `up` in a memory cgroup capped here (the issue's 8 GiB); "
        "0: no cap, the cgroup only counts",
    )  # fmt: skip
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    users = args.users or ([10_000, 100_000] if args.quick else [10_000, 1_000_000])
    items = args.items or ([10_000, 100_000] if args.quick else [10_000, 100_000, 1_000_000])
    summary: dict[str, Any] = {"bench": "scale", "state": None, "catalog": None, "up": None}
    if args.part in ("state", "all"):
        rows = []
        for n in users:
            console.print(f"state: {n:,} users x {args.events_per_user} events ...")
            rows.append(apart(state_row, n, args.events_per_user, args.state_items, args.tail,
                              args.shards, args.seconds, args.seed))  # fmt: skip
        show_state(rows)
        summary["state"] = state_summary(rows)
    if args.part in ("catalog", "all"):
        crows = []
        for n in items:
            console.print(
                f"catalog: one round of {args.round_events:,} events over {n:,} items ..."
            )
            crows.append(apart(catalog_row, n, args.round_events, args.seed))
        dense = None
        if args.dense_reference and crows[-1]["table"] == "rows":
            console.print(f"catalog: the same round over {items[-1]:,} items, table dense ...")
            dense = apart(catalog_row, items[-1], args.round_events, args.seed, False)
        show_catalog(crows + ([dense] if dense else []))
        summary["catalog"] = catalog_summary(crows, dense)
    if args.part in ("up", "all"):
        n, k = (100_000, 10_000) if args.quick else (args.up_users, args.up_items)
        console.print(f"up: holding {n:,} users and a {k:,}-item catalog ...")
        limit = int(args.memory_limit_gib * GIB) if args.memory_limit_gib > 0 else None
        row = apart(up_row, n, args.events_per_user, k, args.tail, args.shards, args.seed, limit)
        show_up(row, args.events_per_user)
        summary["up"] = up_summary(row)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
