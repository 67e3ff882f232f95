"""A real Prometheus scrapes a running short loop: every dashboard panel charts data, and three of
the shipped alerts fire when their fault is made (poison records, a component crash, a model left
stale).

Ray's dashboard lists the node's metrics endpoint in the session's service-discovery file;
Prometheus scrapes it every second and evaluates ``deploy/prometheus/alerts.yml`` every second,
with ``for:`` and thresholds lowered through ``RuleOverride``.

Prometheus computes ``rate``/``increase`` only from what it saw grow. Counters with known labels
(rollouts, gate decisions, component restarts) are exported at 0 from the start; a series Ray
creates at its first observation (a round's histogram, a rollout's freshness samples, the first
dead letters of a reason) already holds it, which no rate shows. So each is made twice, the
second time after Prometheus holds the series, as a running service does after its first round.
"""

from __future__ import annotations

import json
import math
import os
import threading
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

import httpx
import pytest
import ray
import yaml
from kafka import KafkaProducer

from services import runtime
from services.errors import ServiceError
from services.prometheus import promtool
from services.prometheus_run import (
    RULES,
    Prometheus,
    RuleOverride,
    discovery_file,
    rewrite_rules,
    start_prometheus,
)
from services.runtime import Running
from streams.broker import free_port
from streams.config import KafkaConfig
from streams.datasets import DriftSpec, synthetic_drift
from streams.events import Event
from streams.producer import replay
from tests.services.live_loop import running_loop, small_env

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "streamtune.json"
# Grafana's variables, as a dashboard showing the last hour would fill them in.
GRAFANA_VARS = {"$__rate_interval": "1m", "$__interval": "15s", "$__range": "1h"}
POISON = b"not json"


def panel_queries() -> list[tuple[str, str]]:
    dash = json.loads(DASHBOARD.read_text())
    out = []
    for panel in dash["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"]
            for var, value in GRAFANA_VARS.items():
                expr = expr.replace(var, value)
            out.append((panel["title"], expr))
    return out


def test_overrides_change_only_named_thresholds_and_durations() -> None:
    shipped = yaml.safe_load(RULES.read_text())["groups"][0]["rules"]
    text = rewrite_rules(
        RULES.read_text(),
        {
            "StreamtuneModelStale": RuleOverride(for_="2s", thresholds={"300": 12.5}),
            "StreamtuneNoPromotion": RuleOverride(thresholds={">= 0": 1}),
            "StreamtuneRollback": RuleOverride(for_="0s"),
        },
    )
    rules = {r["alert"]: r for r in yaml.safe_load(text)["groups"][0]["rules"]}
    assert rules["StreamtuneModelStale"]["expr"].endswith("> 12.5")
    assert rules["StreamtuneModelStale"]["for"] == "2s"
    assert rules["StreamtuneNoPromotion"]["expr"].endswith("offset 1h) >= 1.0")
    assert "== 0 and" in rules["StreamtuneNoPromotion"]["expr"]
    assert rules["StreamtuneRollback"]["for"] == "0s"
    changed = {"StreamtuneModelStale", "StreamtuneNoPromotion", "StreamtuneRollback"}
    for rule in shipped:  # everything else as shipped
        if rule["alert"] not in changed:
            assert rules[rule["alert"]] == rule
        assert rules[rule["alert"]]["labels"] == rule["labels"]
        assert rules[rule["alert"]]["annotations"] == rule["annotations"]
    out = Path(os.environ.get("TMPDIR", "/tmp")) / f"rewritten-{os.getpid()}.yml"
    out.write_text(text)
    try:
        check = promtool_check(out)
    finally:
        out.unlink()
    assert "SUCCESS: 7 rules found" in check, check


def promtool_check(rules: Path) -> str:
    import subprocess

    proc = subprocess.run([str(promtool()), "check", "rules", str(rules)], capture_output=True,
                          text=True, check=False, timeout=120)  # fmt: skip
    return proc.stdout + proc.stderr


@pytest.mark.parametrize(
    "overrides",
    [
        {"StreamtuneModelStael": RuleOverride(for_="1s")},  # no such alert
        {"StreamtuneModelStale": RuleOverride(thresholds={"30": 1})},  # no such threshold
        {"StreamtuneModelStale": RuleOverride(thresholds={"< 300": 1})},  # not its comparison
        {"StreamtuneNoPromotion": RuleOverride(thresholds={"0": 1})},  # compared with twice
        {"StreamtuneDeadLetters": RuleOverride(for_="5 minutes")},
        {"StreamtuneDeadLetters": RuleOverride(thresholds={"0.01": math.nan})},
    ],
)
def test_an_override_of_what_does_not_exist_is_refused(overrides: dict[str, RuleOverride]) -> None:
    with pytest.raises(ServiceError):
        rewrite_rules(RULES.read_text(), overrides)


@pytest.fixture(scope="module")
def loop(kafka: KafkaConfig, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    state = tmp_path_factory.mktemp("promstate")
    # The dashboard is what writes the service-discovery file Prometheus reads (as under `up`).
    dashboard = {"include_dashboard": True, "dashboard_host": "127.0.0.1",
                 "dashboard_port": free_port()}  # fmt: skip
    with running_loop(small_env(kafka, state, free_port()), **dashboard) as running:
        yield running


@pytest.fixture
def prom(loop: Running) -> Iterator[Prometheus]:
    node = ray._private.worker._global_node  # this test's own session: others may run beside it
    assert node is not None
    session = Path(node.get_session_dir_path())
    with start_prometheus(
        discovery_file(session),
        scrape_interval="1s",
        evaluation_interval="1s",
        overrides={"StreamtuneDeadLetters": RuleOverride(for_="0s")},
    ) as p:
        yield p


@pytest.fixture
def producer(loop: Running) -> Iterator[KafkaProducer]:
    p = KafkaProducer(**loop.settings.kafka.client_kwargs())
    yield p
    p.close()


def wait_for(
    what: str, ok: Callable[[], bool], timeout_s: float = 60.0, every_s: float = 1.0
) -> float:
    """Seconds until ``ok()`` holds; fails after ``timeout_s``."""
    t0 = time.monotonic()
    while not ok():
        assert time.monotonic() - t0 < timeout_s, f"{what}: not within {timeout_s:.0f}s"
        time.sleep(every_s)
    return time.monotonic() - t0


def events(n: int, seed: int) -> list[Event]:
    # Timestamps end now: the freshness the alert watches is then seconds, not years.
    step = 10
    spec = DriftSpec(users=40, events=n, seed=seed, items_per_topic=20, topics=4,
                     new_item_every=200, start_ts_ms=int(time.time() * 1000) - n * step,
                     step_ms=step)  # fmt: skip
    return list(synthetic_drift(spec))


@pytest.mark.slow
@pytest.mark.integration
def test_prometheus_charts_every_panel_and_fires_alerts(
    loop: Running, prom: Prometheus, producer: KafkaProducer, monkeypatch: pytest.MonkeyPatch
) -> None:
    t0 = time.monotonic()

    def stamp(step: str) -> None:
        print(f"[{time.monotonic() - t0:6.1f}s] {step}", flush=True)

    running, s = loop, loop.settings
    wait_for("a first scrape of the node", lambda: any(h == "up" for _, h in prom.targets()))
    stamp(f"scraping {prom.targets()}")
    url = f"http://127.0.0.1:{s.serving.port}"
    dead_sent = 0

    def ingest(batch: list[Event], poison: int) -> None:
        nonlocal dead_sent
        rows = running.buffer.stats().rows
        replay(batch, s.kafka, s.topics.events, producer=producer)
        for _ in range(poison):
            producer.send(s.topics.events, key=b"bad", value=POISON)
        producer.flush()
        dead_sent += poison
        wait_for("ingest", lambda: running.ingestor.stats.dead_letter_total == dead_sent
                 and running.buffer.stats().rows == rows + len(batch), every_s=0.2)  # fmt: skip

    def round_and_rollout() -> None:
        result = running.loop.run_once()
        assert result is not None
        if not result.promoted:  # the gate is not under test: promote by hand, as an operator can
            running.registry.set_champion(result.version, "test", decision="manual-promote")
        assert running.controller is not None
        event = running.controller.step()
        assert event is not None and event.kind == "rollout"
        for user in ("u1", "u2", "u3"):
            r = httpx.post(f"{url}/recommend", json={"user_id": user, "k": 5}, timeout=30)
            assert r.status_code == 200

    # A component crash, injected from outside, so that restarts are counted (and alerted on).
    crash = threading.Event()
    measure = runtime.Gauges.measure

    def crash_when_asked(self: runtime.Gauges) -> None:
        if crash.is_set():
            crash.clear()
            raise RuntimeError("injected gauges crash")
        measure(self)

    monkeypatch.setattr(runtime.Gauges, "measure", crash_when_asked)

    def restart_gauges() -> None:
        n = running.supervisor.restarts["gauges"]
        crash.set()
        wait_for("a gauges restart", lambda: running.supervisor.restarts["gauges"] == n + 1, 30)

    def seen(expr: str) -> bool:
        firing()
        return any(math.isfinite(v) for _, v in prom.query(expr))

    fault_at: dict[str, float] = {}
    fired_after: dict[str, float] = {}

    def firing() -> set[str]:
        """The firing alerts; the first time one is seen, how long after its fault."""
        names = prom.alerts()
        for name in names & fault_at.keys():
            fired_after.setdefault(name, time.monotonic() - fault_at[name])
        return names

    def firing_now(name: str) -> bool:
        return name in firing()

    # Round 1: every series is created (ingest, dead letters, the round, the rollout, requests).
    ingest(events(750, seed=5), poison=5)

    def at_zero(expr: str) -> bool:
        return [v for _, v in prom.query(expr)] == [0.0]

    # Known counter series are exported at 0 before their first increment, so that increment
    # is one Prometheus sees grow (the first restart raises its alert, the first rollback too).
    for expr in ('ray_streamtune_component_restarts_total{component="gauges"}',
                 'ray_streamtune_rollouts_total{kind="rollback"}'):  # fmt: skip
        wait_for(f"{expr} at 0", partial(at_zero, expr), 30)
    restart_gauges()
    stamp("first half ingested")
    round_and_rollout()
    stamp("round 1 rolled out")
    first = [
        "ray_streamtune_ingested_events_total",
        "ray_streamtune_dead_lettered_events_total",
        "ray_streamtune_round_seconds_count",
        "ray_streamtune_round_phase_seconds_count",
        "ray_streamtune_event_freshness_seconds_count",
        "ray_streamtune_component_restarts_total",
        'ray_serve_num_http_requests_total{application="streamtune"}',
        'ray_serve_http_request_latency_ms_count{application="streamtune"}',
    ]
    wait_for("round 1's series in Prometheus", lambda: all(seen(e) for e in first))
    stamp(f"round 1's series scraped; alerts firing: {sorted(firing())}")
    assert prom.query("sum(ray_streamtune_dead_lettered_events_total)")[0][1] == 5
    assert "StreamtuneDeadLetters" not in prom.alerts("firing") | prom.alerts("pending")

    # Round 2: the same again, now as increments Prometheus sees; 20 poison records among 750
    # events is 2.6% dead-lettered (the alert's threshold is 1%).
    fault_at["StreamtuneDeadLetters"] = time.monotonic()
    ingest(events(750, seed=6), poison=20)
    fault_at["StreamtuneComponentRestarted"] = time.monotonic()
    restart_gauges()
    stamp("second half ingested")
    round_and_rollout()
    stamp("round 2 rolled out")

    # The fault: no more promotions. Once Prometheus holds the new champion's freshness, the
    # budget is lowered to the model's age plus 10s: the alert is quiet first, and fires once the
    # model has aged past it.
    champion = running.registry.champion()
    assert champion is not None
    newest = running.registry.meta(champion)["data_max_ts"] / 1000

    def fresh() -> float:
        firing()
        got = prom.query("max(ray_streamtune_model_freshness_seconds)")
        return got[0][1] if got else math.inf

    wait_for("round 2's freshness in Prometheus", lambda: fresh() <= time.time() - newest)
    budget = math.ceil(time.time() - newest) + 10
    stale = {"StreamtuneModelStale": RuleOverride(for_="2s", thresholds={"300": budget})}
    prom.reload({"StreamtuneDeadLetters": RuleOverride(for_="0s"), **stale})
    fault_at["StreamtuneModelStale"] = time.monotonic()
    stamp(f"freshness budget lowered to {budget}s (Prometheus has {fresh():.1f}s)")
    time.sleep(3)  # three evaluations of the new rules
    assert "StreamtuneModelStale" not in firing()

    # Every panel of the dashboard charts at least one finite value.
    results: dict[str, list[float]] = {}

    def panels_have_data() -> bool:
        firing()
        for title, expr in panel_queries():
            results[f"{title}: {expr}"] = [v for _, v in prom.query(expr)]
        return all(any(math.isfinite(v) for v in vs) for vs in results.values())

    try:
        wait_for("every panel's data", panels_have_data, timeout_s=60)
    finally:
        for query, values in results.items():
            print(f"  {len(values)} series {values}  <- {query}")
    stamp("every panel has data")

    # Each alert fires, and the metric under it moved: the faults happened.
    for name in ("StreamtuneDeadLetters", "StreamtuneComponentRestarted", "StreamtuneModelStale"):
        wait_for(f"{name} firing", partial(firing_now, name), 90)
        stamp(f"{name} firing, {fired_after[name]:.1f}s after its fault")
    moved = prom.query("sum(increase(ray_streamtune_dead_lettered_events_total[5m]))")
    assert moved and moved[0][1] > 0  # Prometheus saw dead letters grow
    assert prom.query("sum(ray_streamtune_dead_lettered_events_total)")[0][1] == dead_sent == 25
    restarts = prom.query('sum(ray_streamtune_component_restarts_total{component="gauges"})')
    assert restarts and restarts[0][1] == 2
    assert fresh() > budget  # the fault happened: the serving model aged past its budget
    assert running.registry.champion() == champion
