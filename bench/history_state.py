"""Live history state: bytes per user and rebuild seconds, the compact store against the deque per
user it replaced, in the same run.

    python -m bench.history_state                      # 100k users both ways, 1M compact only
    python -m bench.history_state --users 10000 100000 --events-per-user 100

Each row runs in a fresh process: synthetic events (``events_per_user`` per user, users
interleaved at random, items Zipf-popular over ``--items``) are built as Arrow string columns, as
the history component reads them from the buffer; then the process's RSS is taken, the
structure is rebuilt from those columns the way the history component rebuilds at start, and
RSS is taken again. Bytes per user = the RSS growth over users; it counts the structure and what
the rebuild allocates and keeps (for the deque per user, the Python strings of every kept item).
The deque row is the history component's former rebuild: ``to_pylist`` of both columns, then
one push per event into an ``OrderedDict`` of ``deque(maxlen=history_len)``. It is skipped above
``--deque-max-users`` (at 1M users x 100 events it needs ~100M Python strings).
Goal (issue "internet scale"): at most 1 KB per user at 1M users x 100 items.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import time
from collections import OrderedDict, deque
from typing import Any

import numpy as np
import psutil
import pyarrow as pa
from rich.console import Console
from rich.table import Table

from serving.history_store import HistoryStore

HISTORY_LEN = 100  # serving.history_len's default


def _columns(users: int, per_user: int, items: int, seed: int) -> tuple[pa.Array, pa.Array]:
    rng = np.random.default_rng(seed)
    u = np.repeat(np.arange(users, dtype=np.int64), per_user)
    rng.shuffle(u)
    ranks = rng.zipf(1.2, size=len(u)) % items
    cast = pa.compute.cast
    return cast(pa.array(u), pa.string()), cast(pa.array(ranks.astype(np.int64)), pa.string())


def _rss() -> int:
    return int(psutil.Process().memory_info().rss)


def _one(kind: str, users: int, per_user: int, items: int, seed: int) -> dict[str, Any]:
    uc, ic = _columns(users, per_user, items, seed)
    before = _rss()
    t0 = time.perf_counter()
    if kind == "compact":
        store = HistoryStore(HISTORY_LEN)
        store.load(uc, ic)
        held, probe = len(store), store.get("0")
    else:
        history: OrderedDict[str, deque[str]] = OrderedDict()
        for user, item in zip(uc.to_pylist(), ic.to_pylist(), strict=True):
            h = history.get(user)
            if h is None:
                h = history[user] = deque(maxlen=HISTORY_LEN)
            else:
                history.move_to_end(user)
            h.append(item)
        held, probe = len(history), list(history["0"])
    seconds = time.perf_counter() - t0
    grown = _rss() - before
    assert held == users and len(probe) == min(per_user, HISTORY_LEN)
    return {"structure": kind, "users": users, "events": users * per_user,
            "rebuild_s": round(seconds, 2), "bytes_per_user": round(grown / users),
            "rss_growth_mib": round(grown / 2**20)}  # fmt: skip


def run_apart(kind: str, users: int, per_user: int, items: int, seed: int) -> dict[str, Any]:
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(1) as pool:
        got: dict[str, Any] = pool.apply(_one, (kind, users, per_user, items, seed))
    return got


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.history_state", description=__doc__)
    p.add_argument("--users", type=int, nargs="+", default=[100_000, 1_000_000])
    p.add_argument("--events-per-user", type=int, default=100)
    p.add_argument("--items", type=int, default=100_000, help="catalog the events draw from")
    p.add_argument("--deque-max-users", type=int, default=100_000,
                   help="largest user count the deque-per-user reference runs at")  # fmt: skip
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    rows = []
    for users in a.users:
        kinds = ["compact"] + (["deque per user"] if users <= a.deque_max_users else [])
        for kind in kinds:
            Console(stderr=True).print(f"{kind}: {users:,} users x {a.events_per_user} events ...")
            rows.append(run_apart(kind, users, a.events_per_user, a.items, a.seed))
    t = Table(title=f"live history state, history_len {HISTORY_LEN}")
    for col in ("structure", "users", "events", "rebuild s", "bytes / user", "RSS growth MiB"):
        t.add_column(col, justify="right")
    for r in rows:
        t.add_row(r["structure"], f"{r['users']:,}", f"{r['events']:,}", str(r["rebuild_s"]),
                  f"{r['bytes_per_user']:,}", f"{r['rss_growth_mib']:,}")  # fmt: skip
    Console(width=120).print(t)
    big = [r for r in rows if r["structure"] == "compact" and r["users"] >= 1_000_000]
    print(json.dumps({
        "bench": "history_state", "history_len": HISTORY_LEN, "items": a.items, "rows": rows,
        "goal_1kb_per_user_at_1m": (big[0]["bytes_per_user"] <= 1024) if big else None,
    }), flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
