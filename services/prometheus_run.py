"""A real Prometheus beside streamtune: it scrapes every Ray node and evaluates the shipped alerts.

    python -m services.prometheus run [--session-dir DIR] [--port N]    # `make ops`

``start_prometheus`` writes a ``prometheus.yml`` into a fresh folder and starts the cached
``prometheus`` binary there, in its own process group, on 127.0.0.1. Its targets come from the
file Ray's dashboard keeps listing every live node's metrics endpoint
(``<session dir>/prom_metrics_service_discovery.json``, a ``file_sd_configs`` file), so a cluster's
nodes are scraped as they come and go. Its rules are ``deploy/prometheus/alerts.yml``, as shipped
or with ``RuleOverride``s: a changed ``for:`` and changed threshold constants, nothing else.
"""

from __future__ import annotations

import math
import re
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx
import yaml

from services.descendants import stop_group
from services.errors import ServiceError

RULES = Path(__file__).resolve().parents[1] / "deploy" / "prometheus" / "alerts.yml"
RAY_TEMP_DIR = Path("/tmp/ray")
SD_FILE = "prom_metrics_service_discovery.json"  # ray._private.ray_constants, not imported: no Ray
_DURATION = re.compile(r"(\d+(ms|s|m|h|d|w|y))+")
_THRESHOLD = re.compile(r"\s*(==|!=|>=|<=|>|<)?\s*([0-9][0-9.eE+-]*)\s*")

Series = list[tuple[dict[str, str], float]]


@dataclass(frozen=True)
class RuleOverride:
    """What a run may change in one shipped alert, so that it fires sooner (a test, a drill).

    ``for_``: the new ``for:`` duration ("0s": fires at the first evaluation that holds).
    ``thresholds``: each constant as the shipped expression writes it -> its new value. A key
    is the constant (``"300"``), or the comparison and the constant (``">= 0"``) where the
    expression compares with the same constant twice; each must match exactly one comparison.
    """

    for_: str | None = None
    thresholds: Mapping[str, float] = field(default_factory=dict)


def rewrite_rules(text: str, overrides: Mapping[str, RuleOverride]) -> str:
    """The rules file ``text`` with ``overrides`` (by alert name) applied; ServiceError when an
    override names an alert, or a threshold of it, that the file does not have."""
    doc = yaml.safe_load(text)
    rules = {r["alert"]: r for g in doc["groups"] for r in g["rules"] if "alert" in r}
    unknown = sorted(set(overrides) - set(rules))
    if unknown:
        raise ServiceError(
            f"no alert named {', '.join(unknown)} in the rules; they are: {', '.join(rules)}"
        )
    for name, o in overrides.items():
        rule = rules[name]
        if o.for_ is not None:
            if not _DURATION.fullmatch(o.for_):
                raise ServiceError(f"{name}: for_={o.for_!r} is not a duration such as 30s or 2m")
            rule["for"] = o.for_
        for key, new in o.thresholds.items():
            rule["expr"] = _replace_threshold(name, str(rule["expr"]), key, new)
    return yaml.safe_dump(doc, sort_keys=False, width=1000)


def _replace_threshold(alert: str, expr: str, key: str, new: float) -> str:
    m = _THRESHOLD.fullmatch(key)
    if m is None or not math.isfinite(new):
        raise ServiceError(f"{alert}: threshold {key!r} -> {new!r}: write it as 300 or '>= 0'")
    op, const = m.group(1), m.group(2)
    ops = re.escape(op) if op else "==|!=|>=|<=|>|<"
    # The constant as a whole number token right after a comparison: `> 300` but not `> 3000`.
    pattern = re.compile(rf"({ops})(\s*){re.escape(const)}(?![\w.])")
    out, n = pattern.subn(lambda x: f"{x.group(1)}{x.group(2)}{float(new)!r}", expr)
    if n != 1:
        found = "no comparison" if n == 0 else f"{n} comparisons"
        raise ServiceError(
            f"{alert}: {found} with {key.strip()!r} in `{expr}`; name a threshold "
            "it compares with exactly once (with its operator, e.g. '>= 0', if needed)"
        )
    return out


def discovery_file(session_dir: Path | None = None, temp_dir: Path = RAY_TEMP_DIR) -> Path:
    """Where Ray's dashboard lists its nodes' metrics endpoints (the newest session by default)."""
    return (session_dir or temp_dir / "session_latest") / SD_FILE


class Prometheus:
    """A running Prometheus: its URL, queries, alerts; ``stop()`` ends it and removes its folder."""

    def __init__(self, proc: subprocess.Popen[bytes], url: str, home: Path, rules: Path) -> None:
        self.proc, self.url, self.home, self._rules = proc, url, home, rules
        self._http = httpx.Client(base_url=url, timeout=30)

    def _api(self, path: str, **params: str) -> Any:
        try:
            r = self._http.get(path, params=params)
            body = r.json()
        except (httpx.HTTPError, ValueError) as e:
            raise ServiceError(f"Prometheus at {self.url} did not answer {path}: {e}") from e
        if body.get("status") != "success":
            raise ServiceError(f"Prometheus {path} {params}: {body.get('error', body)}")
        return body["data"]

    def query(self, expr: str) -> Series:
        """``expr`` evaluated now (``/api/v1/query``): each series' labels and value."""
        data = self._api("/api/v1/query", query=expr)
        if data["resultType"] == "vector":
            return [(dict(s["metric"]), float(s["value"][1])) for s in data["result"]]
        if data["resultType"] == "scalar":
            return [({}, float(data["result"][1]))]
        raise ServiceError(f"{expr}: a {data['resultType']} result, not an instant vector")

    def alerts(self, state: str = "firing") -> set[str]:
        """Names of the alerts in ``state`` (firing, or pending: true but not yet for ``for:``)."""
        data = self._api("/api/v1/alerts")
        return {a["labels"]["alertname"] for a in data["alerts"] if a["state"] == state}

    def targets(self) -> list[tuple[str, str]]:
        """Each active scrape target's URL and health (up, down, unknown)."""
        data = self._api("/api/v1/targets", state="active")
        return [(t["scrapeUrl"], t["health"]) for t in data["activeTargets"]]

    def reload(self, overrides: Mapping[str, RuleOverride]) -> None:
        """Evaluate the shipped rules with ``overrides`` from now on (replacing earlier ones)."""
        self._rules.write_text(rewrite_rules(RULES.read_text(), overrides))
        r = self._http.post("/-/reload")
        if r.status_code != 200:
            raise ServiceError(f"Prometheus refused the new rules: {r.text.strip()}")

    def stop(self) -> None:
        self._http.close()
        stop_group(self.proc, grace_s=10.0)
        shutil.rmtree(self.home, ignore_errors=True)

    def __enter__(self) -> Prometheus:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def start_prometheus(
    sd_file: Path,
    *,
    port: int | None = None,
    scrape_interval: str = "15s",
    evaluation_interval: str | None = None,
    overrides: Mapping[str, RuleOverride] | None = None,
    wait_sd_s: float = 30.0,
    ready_timeout_s: float = 60.0,
) -> Prometheus:
    """Prometheus on 127.0.0.1:``port`` (a free one by default), scraping the nodes ``sd_file``
    lists every ``scrape_interval`` and evaluating the alerts (``overrides`` applied) every
    ``evaluation_interval`` (the scrape interval by default); returns once it is ready."""
    from services.prometheus import fetch
    from streams.broker import free_port

    for d in (scrape_interval, evaluation_interval or scrape_interval):
        if not _DURATION.fullmatch(d):
            raise ServiceError(f"{d!r} is not a Prometheus duration such as 1s or 15s")
    deadline = time.monotonic() + wait_sd_s
    while not sd_file.exists():  # the dashboard writes it every few seconds after it starts
        if time.monotonic() > deadline or not sd_file.parent.is_dir():
            raise ServiceError(
                f"{sd_file} does not exist: Ray writes it while its dashboard runs. Start "
                "`streamtune up` (its local Ray has the dashboard), or a cluster with its "
                "dashboard and pass that session's folder (--session-dir /tmp/ray/session_...)"
            )
        time.sleep(0.5)
    binary = shutil.which("prometheus") or str(fetch() / "prometheus")
    home = Path(tempfile.mkdtemp(prefix="streamtune-prometheus-"))
    rules = home / "alerts.yml"
    rules.write_text(rewrite_rules(RULES.read_text(), overrides or {}))
    config = {
        "global": {
            "scrape_interval": scrape_interval,
            # A scrape may not outlast its interval (Prometheus refuses the config otherwise).
            "scrape_timeout": scrape_interval,
            "evaluation_interval": evaluation_interval or scrape_interval,
        },
        "rule_files": [str(rules)],
        "scrape_configs": [
            {
                "job_name": "ray",
                "file_sd_configs": [{"files": [str(sd_file)], "refresh_interval": "5s"}],
            }
        ],
    }
    (home / "prometheus.yml").write_text(yaml.safe_dump(config, sort_keys=False))
    port = port or free_port()
    url = f"http://127.0.0.1:{port}"
    log = home / "prometheus.log"
    cmd = [
        binary, f"--config.file={home / 'prometheus.yml'}", f"--storage.tsdb.path={home / 'data'}",
        f"--web.listen-address=127.0.0.1:{port}", "--web.enable-lifecycle", "--log.level=warn",
    ]  # fmt: skip
    with log.open("ab") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    prom = Prometheus(proc, url, home, rules)
    deadline = time.monotonic() + ready_timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log.read_text(errors="replace")[-3000:]
            shutil.rmtree(home, ignore_errors=True)
            raise ServiceError(
                f"prometheus exited with {proc.returncode}:\n{tail}\n"
                f"is port {port} taken? (`python -m services.prometheus run --port N`)"
            )
        try:
            if httpx.get(f"{url}/-/ready", timeout=2).status_code == 200:
                return prom
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    tail = log.read_text(errors="replace")[-3000:]
    prom.stop()
    raise ServiceError(f"prometheus was not ready at {url} in {ready_timeout_s:.0f}s:\n{tail}")


def run_foreground(sd_file: Path, port: int | None, scrape_interval: str) -> None:
    """Prometheus beside a running ``streamtune up`` until Ctrl-C or SIGTERM."""
    from services.signals import stop_on_signals
    from streams.progress import working

    with working(f"starting Prometheus on the Ray nodes listed in {sd_file}"):
        prom = start_prometheus(sd_file, port=port, scrape_interval=scrape_interval)
    stop = threading.Event()
    try:
        with stop_on_signals(stop):
            with working("waiting for the first scrape of every node"):
                deadline = time.monotonic() + 60
                while not stop.is_set() and time.monotonic() < deadline:
                    targets = prom.targets()
                    if targets and all(h != "unknown" for _, h in targets):
                        break
                    stop.wait(1)
            for target, health in prom.targets():
                print(f"  scraping {target}: {health}")
            print(f"Prometheus: {prom.url}  (rules: deploy/prometheus/alerts.yml)")
            # Debian's binary, unpacked alone, serves the API without the web UI's pages.
            print(f"  alerts: {prom.url}/api/v1/alerts  queries: {prom.url}/api/v1/query?query=up")
            print(f"  Grafana: add {prom.url} as a Prometheus data source and import "
                  "deploy/grafana/streamtune.json; Ctrl-C stops it", flush=True)  # fmt: skip
            while not stop.wait(1):
                if prom.proc.poll() is not None:
                    raise ServiceError(f"prometheus exited with {prom.proc.returncode}")
    finally:
        prom.stop()
