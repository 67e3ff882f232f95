"""Every metric streamtune names is emitted: a short loop on the real broker, Ray and Serve.

The scrape is the node's Prometheus endpoint (Ray's metrics agent), the same one the Grafana
dashboard reads; the dashboard test then checks that it charts only names that exist.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import ray
from kafka import KafkaProducer
from prometheus_client.parser import text_string_to_metric_families

from services import runtime
from services.metrics import SPECS, exported_names
from services.runtime import Running
from streams.broker import free_port
from streams.config import KafkaConfig
from streams.datasets import DriftSpec, synthetic_drift
from streams.producer import replay
from tests.services.live_loop import running_loop, small_env

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "streamtune.json"
EVENTS = list(synthetic_drift(DriftSpec(users=40, events=1500, seed=5, items_per_topic=20,
                                        topics=4, new_item_every=200)))  # fmt: skip
BAD = [b"not json", b'{"schema_version": 1}', b"\xff\xfe"]
Samples = dict[str, list[tuple[dict[str, str], float]]]


@pytest.fixture(scope="module")
def system(kafka: KafkaConfig, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    state = tmp_path_factory.mktemp("metricstate")
    with running_loop(small_env(kafka, state, free_port())) as running:
        yield running


def scrape() -> Samples:
    port = ray.nodes()[0]["MetricsExportPort"]
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    out: Samples = {}
    for fam in text_string_to_metric_families(text):
        for sample in fam.samples:
            out.setdefault(sample.name, []).append((dict(sample.labels), float(sample.value)))
    return out


def value(samples: Samples, name: str, **labels: str) -> float:
    """Sum of the series of ``name`` whose labels include ``labels``."""
    rows = samples.get(name, [])
    return sum(v for lab, v in rows if all(lab.get(k) == x for k, x in labels.items()))


def grafana_exprs() -> list[str]:
    dash = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]


def test_every_metric_is_emitted_with_a_value(
    system: Running, monkeypatch: pytest.MonkeyPatch
) -> None:
    running = system
    s = running.settings
    assert running.controller is not None
    replay(EVENTS, s.kafka, s.topics.events)
    producer = KafkaProducer(**s.kafka.client_kwargs())
    for raw in BAD:
        producer.send(s.topics.events, key=b"bad", value=raw)
    producer.flush()
    producer.close()
    deadline = time.time() + 90
    while running.ingestor.stats.dead_letter_total < len(BAD) and time.time() < deadline:
        time.sleep(0.2)  # dead letters count once the flush after them is durable
    assert running.buffer.stats().rows == len(EVENTS)
    assert running.ingestor.stats.dead_letter_total == len(BAD)

    result = running.loop.run_once()
    assert result is not None
    decision = "promote" if result.promoted else "reject"
    if not result.promoted:  # the gate is not under test here: promote by hand, as an operator can
        running.registry.set_champion(result.version, "test", decision="manual-promote")
    event = running.controller.step()  # the first rollout: Serve now serves the champion
    assert event is not None and event.kind == "rollout"
    url = f"http://127.0.0.1:{s.serving.port}"
    for user in ("u1", "u2", "u3"):
        assert httpx.post(f"{url}/recommend", json={"user_id": user, "k": 5}).status_code == 200

    # One crash, injected from outside, so the restart counter has a value too.
    calls = {"n": 0}
    measure = runtime.Gauges.measure

    def crash_once(self: runtime.Gauges) -> None:
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("injected gauges crash")
        measure(self)

    monkeypatch.setattr(runtime.Gauges, "measure", crash_once)
    deadline = time.time() + 30
    while running.supervisor.restarts["gauges"] < 1 and time.time() < deadline:
        time.sleep(0.2)
    assert running.supervisor.restarts["gauges"] == 1

    wanted = exported_names()
    deadline = time.time() + 60  # Ray exports user metrics every few seconds
    while True:
        samples = scrape()
        missing = wanted - set(samples)
        # buffer_rows is measured with the gauges (every supervisor.gauges_every_s), not at
        # every flush: an export may still carry a value measured while ingest was running.
        if (
            not missing
            and value(samples, "ray_streamtune_component_restarts_total") >= 1
            and value(samples, "ray_streamtune_buffer_rows") == len(EVENTS)
        ):
            break
        assert time.time() < deadline, f"never emitted: {sorted(missing)}"
        time.sleep(2)

    assert value(samples, "ray_streamtune_ingested_events_total") == len(EVENTS)
    assert value(samples, "ray_streamtune_dead_lettered_events_total") == len(BAD)
    assert value(samples, "ray_streamtune_buffer_rows") == len(EVENTS)
    assert value(samples, "ray_streamtune_train_samples_per_second") > 0
    assert value(samples, "ray_streamtune_round_seconds_count") == 1
    for phase in ("read", "prepare", "train", "gate", "register"):
        assert value(samples, "ray_streamtune_round_phase_seconds_count", phase=phase) == 1, phase
    assert value(samples, "ray_streamtune_gate_decisions_total", decision=decision) == 1
    assert value(samples, "ray_streamtune_champion_version") == result.version
    assert value(samples, "ray_streamtune_rollouts_total", kind="rollout") == 1
    assert value(samples, "ray_streamtune_component_restarts_total", component="gauges") == 1
    meta = running.registry.meta(result.version)
    age = time.time() - meta["data_max_ts"] / 1000
    assert 0 < value(samples, "ray_streamtune_model_freshness_seconds") <= age + 1
    assert samples["ray_streamtune_consumer_lag"], "no lag series"
    assert value(samples, "ray_streamtune_consumer_lag") == 0  # everything was ingested
    assert value(samples, "ray_streamtune_eval_ndcg10", set="cand_new_ndcg10") > 0

    # Serve's own metrics, as the dashboard queries them (name, label filters and group-bys).
    deadline = time.time() + 60
    while value(samples, "ray_serve_num_http_requests_total", application=s.serving.app_name) < 3:
        assert time.time() < deadline, "Serve request metrics never appeared"
        time.sleep(2)
        samples = scrape()
    for expr in grafana_exprs():
        for name in set(re.findall(r"\bray_serve_[a-z0-9_]+", expr)):
            assert name in samples, f"{name} (dashboard) is not exported"
            labels = set().union(*(lab.keys() for lab, _ in samples[name]))
            used = set(re.findall(r"(\w+)\s*=", expr)) | {
                g.strip() for m in re.findall(r"by \(([^)]*)\)", expr) for g in m.split(",")
            }
            assert used - {"le"} <= labels, f"{expr}: labels {used - labels} not on {name}"


def test_dashboard_charts_only_emitted_names() -> None:
    exprs = grafana_exprs()
    assert exprs
    ours = exported_names()
    serve_families = _ray_serve_metric_names()
    for expr in exprs:
        names = set(re.findall(r"\bray_[a-z0-9_]+", expr))
        assert names, expr
        for name in names:
            if name.startswith("ray_streamtune_"):
                assert name in ours, f"{name} in the dashboard is not a streamtune metric"
            else:
                base = re.sub(r"_(total|bucket|sum|count)$", "", name.removeprefix("ray_"))
                assert base in serve_families, f"{name} is not a Ray Serve metric"
    # And every streamtune metric is charted.
    charted = {re.sub(r"_(total|bucket|sum|count)$", "", n) for e in exprs
               for n in re.findall(r"\bray_streamtune_[a-z0-9_]+", e)}  # fmt: skip
    assert {f"ray_{spec.name}" for spec in SPECS.values()} == charted


def _ray_serve_metric_names() -> set[str]:
    """Metric names Ray Serve's source defines (``serve_*`` literals, HTTP/gRPC filled in)."""
    serve_src = Path(ray.__file__).parent / "serve"
    names: set[str] = set()
    for f in serve_src.rglob("*.py"):
        if "tests" in f.parts:
            continue
        for lit in re.findall(r"f?[\"'](serve_[a-z0-9_{}]+)[\"']", f.read_text()):
            names.update(lit.replace("{protocol_name}", p) for p in ("http", "grpc"))
    assert "serve_num_http_requests" in names  # the extraction itself works
    return names
