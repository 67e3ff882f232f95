"""Prometheus and promtool, fetched once into the cache (Debian's package, unpacked, not installed).

    python -m services.prometheus fetch      # `make prometheus`; prints where they are
    python -m services.prometheus run        # `make ops`: Prometheus beside `streamtune up`

Used to check the alert rules shipped in ``deploy/prometheus`` (``promtool test rules``), and to
run a real Prometheus on a running streamtune (``services.prometheus_run``). A ``promtool`` or
``prometheus`` already on PATH is used as it is.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from services.errors import ServiceError
from streams.progress import working

CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "streamtune" / "prometheus"
TOOLS = ("prometheus", "promtool")


def fetch(cache: Path = CACHE) -> Path:
    """The folder holding ``prometheus`` and ``promtool``, fetched the first time."""
    if (cache / ".complete").exists():
        return cache
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        raise ServiceError(
            "fetching Prometheus needs apt-get and dpkg-deb (a Debian or Ubuntu machine); "
            "elsewhere install Prometheus 2.x so that `promtool` is on PATH"
        )
    with tempfile.TemporaryDirectory() as tmp:
        with working("downloading Debian's prometheus package (once)"):
            got = _download(Path(tmp))
        with working("unpacking prometheus and promtool"):
            subprocess.run(["dpkg-deb", "-x", str(got), str(Path(tmp) / "x")], check=True)
            staged = cache.with_name(f"{cache.name}.tmp-{os.getpid()}")
            shutil.rmtree(staged, ignore_errors=True)
            staged.mkdir(parents=True)
            for tool in TOOLS:
                shutil.copy2(Path(tmp) / "x" / "usr" / "bin" / tool, staged / tool)
            (staged / ".complete").write_text(got.name)
            if cache.exists():  # another process won the race; its copy is as good as ours
                shutil.rmtree(staged, ignore_errors=True)
            else:
                staged.rename(cache)
    return cache


def _download(into: Path) -> Path:
    """``apt-get download prometheus``, refreshing the package index once if that fails."""
    for attempt in range(2):
        proc = subprocess.run(["apt-get", "download", "-q", "prometheus"], cwd=into,
                              capture_output=True, text=True, check=False)  # fmt: skip
        debs = sorted(into.glob("prometheus_*.deb"))
        if proc.returncode == 0 and debs:
            return debs[-1]
        if attempt == 0:
            update = subprocess.run(["apt-get", "update", "-qq"], capture_output=True,
                                    text=True, check=False)  # fmt: skip
            if update.returncode != 0:
                break
    raise ServiceError(
        f"apt-get could not download prometheus:\n{proc.stdout}{proc.stderr}\n"
        "install Prometheus 2.x so that `promtool` is on PATH instead"
    )


def promtool() -> Path:
    """``promtool`` from PATH, else from the cache (fetched the first time)."""
    found = shutil.which("promtool")
    return Path(found) if found else fetch() / "promtool"


def main(argv: list[str]) -> None:
    from services.prometheus_run import RAY_TEMP_DIR, discovery_file, run_foreground

    parser = argparse.ArgumentParser(prog="python -m services.prometheus")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("fetch", help="fetch prometheus and promtool into the cache")
    run = sub.add_parser("run", help="Prometheus on the running streamtune's Ray nodes")
    run.add_argument(
        "--session-dir",
        type=Path,
        default=None,
        help=f"the Ray session to scrape (default: {RAY_TEMP_DIR}/session_latest)",
    )
    run.add_argument(
        "--sd-file",
        type=Path,
        default=None,
        help="a file_sd_configs file listing the targets (default: the session's)",
    )
    run.add_argument("--port", type=int, default=None, help="default: a free port")
    run.add_argument("--scrape-interval", default="15s")
    args = parser.parse_args(argv)
    if args.command == "fetch":
        print(f"prometheus and promtool in {fetch()}")
        return
    try:
        run_foreground(args.sd_file or discovery_file(args.session_dir), args.port,
                       args.scrape_interval)  # fmt: skip
    except ServiceError as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main(sys.argv[1:])
