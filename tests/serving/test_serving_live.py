"""Serving for real: Ray Serve replicas, the rollout controller, live history from Kafka."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import ray
import torch
from ray import serve

from serving.config import RolloutConfig, ServingConfig
from serving.context import start_context
from serving.http_guard import REPLICA_HEADER
from serving.rollout import RolloutController
from streams.admin import ensure_topics
from streams.broker import free_port
from streams.config import KafkaConfig, TopicsConfig
from streams.events import Event, EventType
from streams.producer import replay
from training.config import ModelConfig
from training.model import Recommender, save_weights
from training.registry import Registry
from training.vocab import ItemVocab

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ITEMS = [f"item{i}" for i in range(200)]
CFG = ModelConfig(max_len=20, d_model=32)


def add_version(reg: Registry, seed: int, broken: bool = False) -> int:
    """Register a small random version. ``broken``: weights all finite (registration refuses
    NaN/inf) but position embeddings x 1e30, so LayerNorm's variance overflows in float32 and
    every request with a history gets non-finite scores - a version that misbehaves only live."""
    torch.manual_seed(seed)
    model = Recommender(CFG, len(ITEMS) + 1)
    if broken:
        with torch.no_grad():
            model.backbone.wpe.weight.mul_(1e30)

    def write(d: Path) -> None:
        save_weights(model, d / "model.safetensors")
        ItemVocab(ITEMS).save(d / "vocab.json")
        (d / "popularity.json").write_text(str([0, *range(len(ITEMS))]))

    meta = {"model_config": CFG.model_dump(), "watermark": {}}
    return reg.register(write, meta, promote=False, reason=f"test version (seed {seed})")


class Stack:
    def __init__(self, reg: Registry, ctl: RolloutController, url: str) -> None:
        self.reg, self.ctl, self.url = reg, ctl, url


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, kafka: KafkaConfig) -> Iterator[Stack]:
    topics = TopicsConfig(events="serving.events", dead_letter="serving.dlq", partitions=2)
    ensure_topics(kafka, topics)
    reg = Registry(tmp_path_factory.mktemp("registry"))
    v1 = add_version(reg, 1)
    reg.set_champion(v1, "first")
    port = free_port()
    # Replicas read the registry on the clock only every 600 s: a rollout that reaches them
    # sooner came through the controller's announcement (the app deployed on its own, below).
    cfg = ServingConfig(port=port, replicas=2, follow_s=600.0, history_shards=2)
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    ctx = start_context(kafka, topics, None, cfg)
    ctl = RolloutController(
        reg, cfg, RolloutConfig(watch_s=60, min_requests=10, max_p99_ms=2000), ctx
    )
    ctl.step()
    st = Stack(reg, ctl, f"http://127.0.0.1:{port}")
    st.kafka, st.topics = kafka, topics  # type: ignore[attr-defined]
    yield st
    assert ctl.close(), "a serve.run outlived the tests"
    serve.shutdown()
    ray.shutdown()


class Load:
    """Client threads hammering /recommend; records every status and version."""

    def __init__(self, url: str, threads: int = 4) -> None:
        self.url, self.stop = url, threading.Event()
        self.results: list[tuple[int, int | None]] = []
        self.failures: list[str] = []
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, args=(i,)) for i in range(threads)]

    def _run(self, i: int) -> None:
        with httpx.Client(timeout=10) as c:
            n = 0
            while not self.stop.is_set() and n < 20_000:
                n += 1
                body = {"history": ITEMS[i : i + 5], "k": 10}
                r = c.post(f"{self.url}/recommend", json=body)
                v = r.json().get("version") if r.status_code == 200 else None
                with self.lock:
                    if r.status_code != 200 and len(self.failures) < 5:
                        self.failures.append(r.text[:300])
                    self.results.append((r.status_code, v))

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=30)


def test_ten_rollouts_under_load_fail_no_request(stack: Stack) -> None:
    champions = {stack.reg.champion()}
    with Load(stack.url) as load:
        time.sleep(1.0)
        for seed in range(2, 12):
            v = add_version(stack.reg, seed)
            stack.reg.set_champion(v, "test rollout")
            champions.add(v)
            ev = stack.ctl.step()
            assert ev is not None and ev.kind == "rollout" and ev.version == v
            time.sleep(0.5)
        time.sleep(1.0)
    statuses = [s for s, _ in load.results]
    assert len(statuses) > 200
    assert all(s == 200 for s in statuses), load.failures
    versions = {v for _, v in load.results}
    assert versions <= champions, versions - champions
    assert len(versions) >= 5  # traffic really moved across versions
    models = httpx.get(f"{stack.url}/models").json()
    assert models["champion"] == max(c for c in champions if c is not None)


def test_version_that_fails_to_load_is_rolled_back(stack: Stack) -> None:
    good = stack.reg.champion()
    bad = add_version(stack.reg, 99)
    stack.reg.set_champion(bad, "looks fine on disk")
    weights = stack.reg.path(bad) / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # corrupted after promotion
    with Load(stack.url, threads=2) as load:
        stack.ctl.step()  # rollout: the replicas refuse the version and keep `good`
        deadline = time.time() + 20
        while stack.reg.champion() != good and time.time() < deadline:
            stack.ctl.step()
            time.sleep(0.3)
    assert stack.reg.champion() == good
    assert all(s == 200 for s, _ in load.results)
    assert {v for _, v in load.results} == {good}
    last = stack.reg.decisions()[-1]
    assert last["decision"] == "rollback" and last["version"] == bad
    assert "failed to load" in last["reason"]


def test_version_whose_errors_spike_is_rolled_back(stack: Stack) -> None:
    good = stack.reg.champion()
    bad = add_version(stack.reg, 100, broken=True)
    stack.reg.set_champion(bad, "looks fine offline")
    with Load(stack.url, threads=2) as load:
        ev = stack.ctl.step()
        assert ev is not None and ev.version == bad
        deadline = time.time() + 30
        while stack.reg.champion() != good and time.time() < deadline:
            time.sleep(0.6)
            stack.ctl.step()
        time.sleep(1.0)  # and it keeps answering, from the good version again
    assert stack.reg.champion() == good
    last = stack.reg.decisions()[-1]
    assert last["decision"] == "rollback" and "error rate" in last["reason"]
    tail = load.results[-20:]
    assert all(s == 200 and v == good for s, v in tail), tail


def test_click_in_kafka_changes_next_recommendation(stack: Stack) -> None:
    user = f"click-user-{time.time_ns()}"
    body = {"user_id": user, "k": 10, "exclude_seen": True}
    before = httpx.post(f"{stack.url}/recommend", json=body).json()
    assert before["source"] == "popularity" and before["history_len"] == 0
    clicked = before["items"][0]["item_id"]
    t0 = time.monotonic()
    event = Event(event_id=f"c-{user}", user_id=user, item_id=clicked,
                  event_type=EventType.CLICK, ts=int(time.time() * 1000))  # fmt: skip
    replay([event], stack.kafka, stack.topics.events)  # type: ignore[attr-defined]
    after, shown = before, set()  # the replicas (each with its own cache) that show the click
    while time.monotonic() - t0 < 5.0 and len(shown) < 2:
        r = httpx.post(f"{stack.url}/recommend", json=body)
        after = r.json()
        if after["history_len"] == 1:
            shown.add(r.headers[REPLICA_HEADER])
        time.sleep(0.02)
    elapsed = time.monotonic() - t0
    assert after["history_len"] == 1 and after["source"] == "history", after
    assert len(shown) == 2, f"only replicas {shown} show the click after {elapsed:.2f}s"
    assert elapsed < 2.0, f"history took {elapsed:.2f}s"
    ids = [i["item_id"] for i in after["items"]]
    assert clicked not in ids  # exclude_seen
    assert ids != [i["item_id"] for i in before["items"]]  # the ranking moved
    # The user lives in exactly one of the two shards, which /models (and `status`) report.
    shards = httpx.get(f"{stack.url}/models").json()["history_shards"]
    assert [sh["shard"] for sh in shards] == [0, 1] and all(sh["answering"] for sh in shards)
    assert sum(sh["users"] for sh in shards) >= 1


@pytest.mark.parametrize(
    ("body", "status"),
    [
        (b"{not json", 422),
        (b"", 422),
        (b'{"history": ["item1"], "k": 100000}', 422),
        (b'{"history": ["item1"], "k": "ten"}', 422),
        (b'{"history": "item1"}', 422),
        (b'{"user_id": 5}', 422),
        (b'{"history": ["item1"], "surprise": true}', 422),
        (b'{"k": 5}', 422),
        (b'{"history": ["item1"], "diversity": 2}', 422),
        (('{"history": [' + ",".join(['"item1"'] * 100_000) + "]}").encode(), 413),
    ],
)
def test_bad_requests_get_4xx(stack: Stack, body: bytes, status: int) -> None:
    r = httpx.post(
        f"{stack.url}/recommend", content=body, headers={"content-type": "application/json"}
    )
    assert r.status_code == status, r.text


def test_unknown_user_and_items_fall_back_and_say_so(stack: Stack) -> None:
    r = httpx.post(f"{stack.url}/recommend", json={"user_id": "nobody", "k": 3}).json()
    assert r["source"] == "popularity" and len(r["items"]) == 3
    r = httpx.post(f"{stack.url}/recommend", json={"history": ["nope", "item3"], "k": 3}).json()
    assert r["unknown_items"] == 1 and r["source"] == "history"
    s = httpx.post(f"{stack.url}/score", json={"history": ["item3"], "items": ["item4", "zz"]})
    assert s.status_code == 200 and s.json()["scores"]["zz"] is None
    diverse = httpx.post(
        f"{stack.url}/recommend", json={"history": ["item3"], "k": 10, "diversity": 0.9}
    ).json()
    assert len({i["item_id"] for i in diverse["items"]}) == 10


def test_an_announced_rollout_reaches_replicas_the_controller_does_not_deploy(
    stack: Stack,
) -> None:
    """A controller that does not own the app (a RayService) only records the version and
    announces it; the replicas poll the registry every 600 s here, so serving the new version
    within seconds proves the announcement woke them."""
    own = RolloutController(
        stack.reg, ServingConfig(), RolloutConfig(watch_s=0), stack.ctl.context, owns_app=False
    )
    own.deployed = True  # the app is up (the stack's controller deployed it): no restore step
    v = add_version(stack.reg, 99)
    stack.reg.set_champion(v, "announced rollout")
    t0 = time.monotonic()
    ev = own.step()
    assert ev is not None and ev.kind == "rollout" and ev.version == v
    served: set[int] = set()
    with httpx.Client(timeout=10) as c:
        while time.monotonic() - t0 < 10.0 and served != {v}:
            served = {
                c.post(f"{stack.url}/recommend", json={"history": ITEMS[:3], "k": 3}).json()[
                    "version"
                ]
                for _ in range(8)  # two replicas: several requests reach both
            }
    took = time.monotonic() - t0
    assert served == {v}, f"replicas still serve {served} {took:.1f}s after the announcement"
    assert took < 10.0
    stack.ctl.current = v  # the stack's controller follows the registry from here on
