"""What a round's read of its users' histories costs as the index grows.

    python -m bench.history_read                  # a 1M-user index, a round of 20k users
    python -m bench.history_read --users 100000   # smaller

Writes one snapshot part of ``--users`` users (50 recent and 100 seen rows each, row groups as
the product writes them), then reads ``--round-users`` random users' entries in a fresh process
each way: the product's ``training.histories.read_table`` (row group by row group, skipping groups
whose user range holds none) and, as the reference, one pushed-down filtered read of the part
(``pyarrow.parquet.read_table(filters=...)``, what the index used before). Prints seconds, peak
RSS and what Arrow's memory pool still holds after the read, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from rich.console import Console
from rich.table import Table

from training.histories import FILE, read_table

WAYS = ("product", "filtered_read")


def write_index(directory: Path, users: int) -> None:
    rng = np.random.default_rng(0)

    def lists(width: int) -> pa.ListArray:
        offsets = pa.array(np.arange(0, width * users + 1, width, dtype=np.int32))
        return pa.ListArray.from_arrays(offsets, rng.integers(1, 100_000, width * users, np.int32))

    ids = pa.array([f"user{u:08d}" for u in range(users)])
    table = pa.table({"user_id": ids, "recent": lists(50), "seen": lists(100)})
    pq.write_table(table, directory / FILE, row_group_size=16_384)  # as training.histories does


def measure(directory: Path, users: int, round_users: int, way: str) -> dict[str, float]:
    wanted = [f"user{u:08d}" for u in random.Random(1).sample(range(users), round_users)]
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t = time.perf_counter()
    if way == "product":
        got = read_table(directory, wanted)
    else:
        flt = pc.field("user_id").isin(pa.array(sorted(wanted), pa.string()))
        got = pq.read_table(directory / FILE, filters=flt)
    seconds = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "rows": got.num_rows,
        "seconds": round(seconds, 3),
        "peak_rss_mb": round(peak / 1024, 1),
        "rss_growth_mb": round((peak - before) / 1024, 1),
        "arrow_held_mb": round(pa.total_allocated_bytes() / 2**20, 1),
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--users", type=int, default=1_000_000, help="users in the index")
    ap.add_argument("--round-users", type=int, default=20_000, help="users a round reads")
    ap.add_argument("--one", nargs=2, metavar=("DIR", "WAY"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one:  # a child: write the index, or read it one way, in a process of its own
        directory, way = Path(args.one[0]), args.one[1]
        if way == "write":
            write_index(directory, args.users)
        else:
            print(json.dumps(measure(directory, args.users, args.round_users, way)))
        return
    rows: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        # Every part in a child of this small process: Linux carries a process's peak RSS
        # across exec, so a child of the writer would start at the writer's peak.
        for way in ("write", *WAYS):
            out = subprocess.run(
                [sys.executable, "-m", "bench.history_read", "--users", str(args.users),
                 "--round-users", str(args.round_users), "--one", tmp, way],
                capture_output=True, text=True, check=True,
            ).stdout  # fmt: skip
            if way != "write":
                rows[way] = json.loads(out.strip().splitlines()[-1])
    title = f"reading {args.round_users:,} users' entries of a {args.users:,}-user index"
    table = Table(title=title)
    for col in ("way", "rows", "seconds", "peak RSS MB", "RSS growth MB", "Arrow still holds MB"):
        table.add_column(col, justify="right")
    for way, r in rows.items():
        table.add_row(way, f"{r['rows']:,}", f"{r['seconds']:.2f}", f"{r['peak_rss_mb']:.0f}",
                      f"{r['rss_growth_mb']:.0f}", f"{r['arrow_held_mb']:.0f}")  # fmt: skip
    Console().print(table)
    ref, ours = rows["filtered_read"], rows["product"]
    print(json.dumps({
        "bench": "history_read", "users": args.users, "round_users": args.round_users,
        "ways": rows, "seconds_ratio": round(ours["seconds"] / ref["seconds"], 3),
        "rss_growth_ratio": round(ours["rss_growth_mb"] / max(ref["rss_growth_mb"], 1e-9), 3),
    }))  # fmt: skip


if __name__ == "__main__":
    main()
