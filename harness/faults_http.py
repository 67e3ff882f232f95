"""Faults at the HTTP edge: a fuzzer over the live contract, and a Serve replica killed under load.

    fault_http_fuzz(url, tmp, quick)   schemathesis, all of its checks, over a live /openapi.json
    fault_replica_kill(tmp, quick)     SIGKILL of one of 2 replicas under 8-thread closed-loop load

Both start their own Ray and Serve (a registry with one small seeded version: the contract and
the failover do not depend on trained weights) unless given a URL, and return one row of the
fault table (bench/faults.py).
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import torch

from serving.config import ServingConfig
from streams.broker import free_port
from training.config import ModelConfig
from training.model import Recommender
from training.registry import Registry, VersionContent, write_content
from training.vocab import ItemVocab

ITEMS = [f"item{i}" for i in range(200)]
MODEL = ModelConfig(max_len=20, d_model=32)
FUZZ_CASES = 1000  # the floor for the bench row
FUZZ_KEY = "fuzz-key-not-a-secret"


def add_version(reg: Registry, seed: int) -> int:
    """A seeded random version over ITEMS (finite weights), made champion."""
    torch.manual_seed(seed)
    model = Recommender(MODEL, len(ITEMS) + 1)

    def write(d: Path) -> None:
        write_content(d, model, VersionContent(ItemVocab(ITEMS), [0, *range(len(ITEMS))]))

    version = reg.register(write, {"model_config": MODEL.model_dump(), "watermark": {}})
    reg.set_champion(version, "fault bench")
    return version


@contextmanager
def serve_app(tmp: Path, cfg: ServingConfig) -> Iterator[str]:
    """Ray + Serve + the streamtune app on cfg.port; yields its base URL once it answers."""
    import ray
    from ray import serve

    from serving.application import build_app

    reg = Registry(tmp / "registry")
    version = add_version(reg, 1)
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": cfg.port})
        serve.run(build_app(reg, cfg, version), name=cfg.app_name, route_prefix="/")
        url = f"http://127.0.0.1:{cfg.port}"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{url}/healthz", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        else:
            raise TimeoutError(f"the app at {url} did not become healthy")
        yield url
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()


# -- HTTP fuzzing ------------------------------------------------------------------------------


def fuzz(
    url: str, max_examples: int, api_key: str | None = None, seed: int = 7, workers: int = 2
) -> dict[str, Any]:
    """Schemathesis over ``url``/openapi.json with every check it has (its default set).

    Phases: examples, coverage (boundary values and near-misses) and fuzzing (positive and
    negative data); stateful testing is skipped by schemathesis itself (the API has no links).
    Returns cases, statuses, and the failed checks (name, operation, message) deduplicated.
    """
    import schemathesis
    from schemathesis.config._checks import NEGATIVE_DATA_REJECTION_EXPECTED_STATUSES
    from schemathesis.engine import Status, events, from_schema

    raw: dict[str, Any] = {
        "seed": seed,
        "workers": workers,
        "request-timeout": 30,
        "cache": {"enabled": False},  # no .schemathesis/ folder left in the working tree
        "generation": {"max-examples": max_examples, "database": "none"},
        # 413 is a rejection too (documented on every operation): an invalid body that is also
        # over the byte limit is refused before it is parsed. The other checks keep defaults.
        "checks": {
            "negative_data_rejection": {
                "expected-statuses": [*NEGATIVE_DATA_REJECTION_EXPECTED_STATUSES, "413"]
            }
        },
    }
    if api_key is not None:
        raw["headers"] = {"X-API-Key": api_key}
    config = schemathesis.Config.from_dict(raw)
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json", config=config)
    cases = 0
    statuses: Counter[int] = Counter()
    failures: dict[tuple[str, str, str], int] = {}
    examples: dict[tuple[str, str, str], str] = {}
    errors: list[str] = []
    checks_run: Counter[str] = Counter()
    stop = "?"
    for event in from_schema(schema).execute():
        if isinstance(event, events.ScenarioFinished):
            rec = event.recorder
            cases += len(rec.cases)
            for inter in rec.interactions.values():
                if inter.response is not None:
                    statuses[inter.response.status_code] += 1
            for nodes in rec.checks.values():
                for node in nodes:
                    checks_run[node.name] += 1
                    if node.status == Status.FAILURE and node.failure_info is not None:
                        f = node.failure_info.failure
                        key = (node.name, rec.label, f.title)
                        failures[key] = failures.get(key, 0) + 1
                        examples.setdefault(key, f"{f.message} | {node.failure_info.code_sample}")
            if event.status == Status.ERROR:
                errors.append(f"{rec.label}: error")
        elif isinstance(event, events.NonFatalError):
            errors.append(f"{event.label}: {event.value!r}"[:300])
        elif isinstance(event, events.FatalError):
            errors.append(f"fatal: {event.exception!r}"[:300])
        elif isinstance(event, events.EngineFinished):
            stop = str(event.stop_reason)
    return {
        "cases": cases,
        "statuses": dict(sorted(statuses.items())),
        "server_errors": sum(n for s, n in statuses.items() if s >= 500),
        "failures": [
            {
                "check": c,
                "operation": op,
                "title": t,
                "count": n,
                "example": examples[(c, op, t)][:600],
            }
            for (c, op, t), n in sorted(failures.items())
        ],
        "checks": dict(sorted(checks_run.items())),
        "errors": errors,
        "stop_reason": stop,
    }


def fuzz_rounds(
    url: str, max_examples: int, target: int, api_key: str | None, max_rounds: int = 6
) -> dict[str, Any]:
    """Fuzz rounds with seeds 7, 8, ... until ``target`` cases ran in all; results summed.

    Hypothesis stops a round early once its search space looks exhausted, so one round's
    case count varies; more seeds reach new inputs.
    """
    total: dict[str, Any] = {"cases": 0, "server_errors": 0, "failures": [], "errors": [],
                             "rounds": 0}  # fmt: skip
    statuses: Counter[int] = Counter()
    checks: Counter[str] = Counter()
    while True:
        res = fuzz(url, max_examples, api_key=api_key, seed=7 + total["rounds"])
        total["rounds"] += 1
        for k in ("cases", "server_errors", "failures", "errors"):
            total[k] += res[k]
        statuses.update(res["statuses"])
        checks.update(res["checks"])
        total["stop_reason"] = res["stop_reason"]
        if total["cases"] >= target or total["rounds"] >= max_rounds:
            break
    total["statuses"] = dict(sorted(statuses.items()))
    total["checks"] = dict(sorted(checks.items()))
    return total


def fault_http_fuzz(url: str | None, tmp: Path, quick: bool) -> dict[str, Any]:
    """The "HTTP fuzzing" row: >= 1,000 cases (fewer with ``quick``), 0 5xx, 0 failed checks.

    With ``url`` None a Serve app with an API key is started, so the auth rules are fuzzed too.
    """
    # Hypothesis examples per operation and mode (one round of 500 runs ~600 cases here).
    max_examples, target = (150, 0) if quick else (500, FUZZ_CASES)
    if url is not None:
        res = fuzz_rounds(url, max_examples, target, None)
    else:
        cfg = ServingConfig(port=free_port(), replicas=1, api_key=FUZZ_KEY)  # type: ignore[arg-type]
        with serve_app(tmp, cfg) as live:
            res = fuzz_rounds(live, max_examples, target, FUZZ_KEY)
    enough = quick or res["cases"] >= FUZZ_CASES
    survived = enough and not res["failures"] and not res["errors"] and res["server_errors"] == 0
    detail = (
        f"{res['cases']} cases in {res['rounds']} round(s), statuses {res['statuses']}, "
        f"{len(res['failures'])} failing checks, stop {res['stop_reason']}"
    )
    if res["failures"]:
        detail += "; " + "; ".join(
            f"{f['check']} on {f['operation']}: {f['title']} (x{f['count']})"
            for f in res["failures"][:6]
        )
    if res["errors"]:
        detail += "; errors: " + "; ".join(res["errors"][:3])
    return {
        "fault": "HTTP fuzzing",
        "survived": survived,
        "lost": None,  # no events in play: not measured
        "duplicated": None,
        "failed_requests": res["server_errors"],
        "recover_s": None,  # nothing to recover from
        "cases": res["cases"],
        "statuses": res["statuses"],
        "checks": res["checks"],
        "failures": res["failures"],
        "detail": detail,
    }


def fault_http_fuzz_bench(tmp: Path, quick: bool) -> dict[str, Any]:
    """bench.faults entry: fuzz an app of its own."""
    return fault_http_fuzz(None, tmp, quick)


# -- Serve replica killed ----------------------------------------------------------------------


class ClosedLoop:
    """``threads`` clients, each sending its next /recommend when the previous one answered."""

    def __init__(self, url: str, threads: int = 8) -> None:
        self.url, self.stop = url, threading.Event()
        self.lock = threading.Lock()
        self.results: list[
            tuple[float, int]
        ] = []  # (monotonic time answered, status; 0 = no answer)
        self.failures: list[str] = []
        self.threads = [threading.Thread(target=self._run, args=(i,)) for i in range(threads)]

    def _run(self, i: int) -> None:
        body = {"history": ITEMS[i : i + 5], "k": 10}
        with httpx.Client(timeout=30) as client:
            while not self.stop.is_set():
                try:
                    status = client.post(f"{self.url}/recommend", json=body).status_code
                    why = "" if status == 200 else f"HTTP {status}"
                except httpx.HTTPError as err:
                    status, why = 0, f"{type(err).__name__}: {err}"
                with self.lock:
                    self.results.append((time.monotonic(), status))
                    if why and len(self.failures) < 5:
                        self.failures.append(why[:200])

    def __enter__(self) -> ClosedLoop:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=60)


def replica_pids(app_name: str) -> set[int]:
    """Pids of the live replica processes of ``app_name``'s recommender deployment.

    Ray titles each replica process ``ray::ServeReplica:<app>:<deployment>``; the fault gives its
    app a name of its own, so another Serve on the same machine is never matched.
    """
    import psutil

    title = f"ServeReplica:{app_name}:recommender"
    pids = set()
    for proc in psutil.process_iter(["cmdline", "status"]):
        cmd = " ".join(proc.info["cmdline"] or [])
        if title in cmd and proc.info["status"] != psutil.STATUS_ZOMBIE:
            pids.add(proc.pid)
    return pids


def running_replicas(app_name: str) -> int:
    """Replicas of the recommender deployment that Serve reports RUNNING."""
    from ray import serve

    app = serve.status().applications.get(app_name)
    if app is None or "recommender" not in app.deployments:
        return 0
    states = app.deployments["recommender"].replica_states
    return int(sum(n for state, n in states.items() if str(state).endswith("RUNNING")))


def fault_replica_kill(tmp: Path, quick: bool) -> dict[str, Any]:
    """The "Serve replica killed" row: SIGKILL one of 2 replicas under 8 closed-loop clients.

    Proven: the victim's pid is gone, a replica process with a new pid appears and Serve
    reports 2 RUNNING again. Failed requests are every non-200 or unanswered request from the
    kill until the end of the load (goal 0; at most those in flight on the victim).
    """
    app_name = f"replica-kill-{os.getpid()}"  # our replicas' process titles, no one else's
    cfg = ServingConfig(port=free_port(), replicas=2, app_name=app_name)
    with serve_app(tmp, cfg) as url:
        deadline = time.monotonic() + 60
        while len(before := replica_pids(app_name)) < 2 or running_replicas(app_name) < 2:
            if time.monotonic() > deadline:
                raise TimeoutError(f"2 replicas expected, found pids {before}")
            time.sleep(0.5)
        with ClosedLoop(url, threads=8) as load:
            time.sleep(2.0 if quick else 5.0)  # steady load first
            victim = min(before)
            killed_at = time.monotonic()
            os.kill(victim, signal.SIGKILL)
            recover_s, new = None, set()
            while time.monotonic() - killed_at < 120:
                pids = replica_pids(app_name)
                new = pids - before
                if victim not in pids and new and running_replicas(app_name) >= 2:
                    recover_s = time.monotonic() - killed_at
                    break
                time.sleep(0.2)
            time.sleep(3.0 if quick else 10.0)  # and keep serving on the replacement
        after = replica_pids(app_name)
    before_kill = [s for t, s in load.results if t < killed_at]
    since_kill = [s for t, s in load.results if t >= killed_at]
    failed = sum(1 for s in since_kill if s != 200)
    victim_gone = victim not in after
    survived = (
        recover_s is not None and victim_gone and failed <= 8 and all(s == 200 for s in before_kill)
    )
    return {
        "fault": "Serve replica killed",
        "survived": survived,
        "lost": None,  # requests only: events are not in play
        "duplicated": None,
        "failed_requests": failed,
        "recover_s": round(recover_s, 2) if recover_s is not None else None,
        "requests": len(load.results),
        "requests_after_kill": len(since_kill),
        "detail": (
            f"killed replica pid {victim} (gone: {victim_gone}); new replica pid(s) "
            f"{sorted(new)}; {failed} of {len(since_kill)} requests after the kill failed"
            + (f" ({'; '.join(load.failures[:3])})" if load.failures else "")
        ),
    }
