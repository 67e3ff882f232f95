"""The fault suite: each fault against the real components, one table row each.

    python -m bench.faults [--quick] [--only NAME ...]

Every fault starts what it needs (its own Kafka broker on free ports, its own Ray / Serve, its own
buffer and registry under a temporary directory), injects the fault from outside the product (a
signal, a full tmpfs, flipped bytes, a fuzzer), and reports whether the system survived: events
lost and duplicated, failed requests, and seconds until it recovered. Each fault runs in its own
Python process, so one fault's Ray or Serve instance can never leak into the next.

The faults themselves are harness fixtures (``harness/faults_streams.py``,
``harness/faults_training.py``, ``harness/faults_registry.py``, ``harness/faults_http.py``): the
tests call the same functions (quick forms), so CI runs every row.
"""

from __future__ import annotations

import argparse
import importlib
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

# name -> "module:function"; each function is ``fn(tmp: Path, quick: bool) -> dict``.
FAULTS: dict[str, str] = {
    "broker killed": "harness.faults_streams:fault_broker_kill",
    "training worker killed": "harness.faults_training:fault_worker_kill",
    "serve replica killed": "harness.faults_http:fault_replica_kill",
    "disk full": "harness.faults_streams:fault_disk_full",
    "corrupt segment": "harness.faults_streams:fault_corrupt_segment",
    "stalled member": "harness.faults_streams:fault_stalled_member",
    "loop killed mid-registration": "harness.faults_registry:fault_register_decision_kill",
    "HTTP fuzzing": "harness.faults_http:fault_http_fuzz_bench",
}
ROW_KEYS = ("survived", "lost", "duplicated", "failed_requests", "recover_s")


def resolve(spec: str) -> Callable[[Path, bool], dict[str, Any]]:
    module, _, name = spec.partition(":")
    fn: Callable[[Path, bool], dict[str, Any]] = getattr(importlib.import_module(module), name)
    return fn


def run_one(name: str, quick: bool, timeout_s: float) -> dict[str, Any]:
    """Run one fault in a child process; a crash or a timeout is a row that did not survive."""
    with tempfile.TemporaryDirectory(prefix="fault-") as tmp:
        out = Path(tmp) / "row.json"
        cmd = [sys.executable, "-m", "bench.faults", "--child", name, "--row", str(out)]
        cmd += ["--quick"] if quick else []
        t0 = time.monotonic()
        try:
            proc = subprocess.run(cmd, timeout=timeout_s, capture_output=True, text=True)
            if proc.returncode == 0 and out.exists():
                row: dict[str, Any] = json.loads(out.read_text())
                return row
            why = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            detail = f"exit {proc.returncode}: {why[0][:300]}"
        except subprocess.TimeoutExpired:
            detail = f"timed out after {timeout_s:.0f} s"
        return {"fault": name, "survived": False, "lost": None, "duplicated": None,
                "failed_requests": None, "recover_s": round(time.monotonic() - t0, 1),
                "detail": detail}  # fmt: skip


def child(name: str, row_path: Path, quick: bool) -> None:
    with tempfile.TemporaryDirectory(prefix="fault-work-") as tmp:
        row = resolve(FAULTS[name])(Path(tmp), quick)
    row = {"fault": name, **{k: v for k, v in row.items() if k != "fault"}}
    row_path.write_text(json.dumps(row, default=str))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="Smaller loads (under 10 minutes).")
    ap.add_argument("--only", nargs="*", choices=list(FAULTS), help="Run only these faults.")
    ap.add_argument("--timeout", type=float, default=600, help="Seconds allowed per fault.")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--row", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.row, args.quick)
        return

    t0 = time.monotonic()
    rows = []
    for name in args.only or list(FAULTS):
        Console(stderr=True).print(f"[bold]fault:[/] {name} ...")
        rows.append(run_one(name, args.quick, args.timeout))
    table = Table("fault", "survived", "lost", "duplicated", "failed req", "recover s", "detail",
                  title=f"bench.faults{' --quick' if args.quick else ''}")  # fmt: skip
    for r in rows:
        table.add_row(
            r["fault"], "yes" if r.get("survived") else "NO",
            *("-" if r.get(k) is None else str(r[k]) for k in ROW_KEYS[1:]),
            str(r.get("detail", ""))[:90],
        )  # fmt: skip
    Console(width=200).print(table)
    summary = {
        "bench": "faults",
        "quick": args.quick,
        "all_survived": all(r.get("survived") for r in rows),
        "seconds": round(time.monotonic() - t0, 1),
        "faults": {r["fault"]: {k: v for k, v in r.items() if k != "fault"} for r in rows},
    }
    print(json.dumps(summary, default=str))


if __name__ == "__main__":
    main()
