"""Live rollback triggers: error rate, p99 and click-through, each through real HTTP traffic (and
real Kafka clicks) on a real Ray Serve app, plus a controller restarted mid-watch.

Every test builds its own ``RolloutController`` over the one registry (with the rollout config
the test needs); the controller's state lives in the registry, so each new controller picks up
what the previous one served - which is itself what the restart test checks explicitly.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import httpx
import pytest
import ray
import torch
from safetensors.torch import load_file

from streams.events import Event, EventType
from streams.producer import replay
from tests.serving.conftest import LOOSE, Live, drive
from tests.serving.test_serving_live import Load, add_version
from training.registry import Registry

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def finite_version_that_breaks_at_request_time(reg: Registry, seed: int) -> int:
    """Registration refuses NaN weights, so this version's weights are all finite - just so large
    (position embeddings x 1e30) that LayerNorm's variance overflows to inf in float32 on every
    request with a history, and the replica answers 500 (non-finite scores)."""
    return add_version(reg, seed, broken=True)


def test_error_rate_rollback_through_live_traffic(live: Live) -> None:
    ctl = live.controller(**LOOSE)
    good = live.reg.champion()
    bad = finite_version_that_breaks_at_request_time(live.reg, 100)
    weights = load_file(str(live.reg.path(bad) / "model.safetensors"))
    assert all(bool(torch.isfinite(t).all()) for t in weights.values())  # it did register
    live.reg.set_champion(bad, "looks fine offline")
    with Load(live.url, threads=2) as load:
        ev = ctl.step()
        assert ev is not None and ev.kind == "rollout" and ev.version == bad
        drive(ctl, lambda: live.reg.champion() == good, timeout=120)
        time.sleep(1.5)  # and it keeps answering, from the good version again
    assert live.reg.champion() == good
    last = live.reg.decisions()[-1]
    assert last["decision"] == "rollback" and last["version"] == bad, last
    assert "error rate" in last["reason"] and last["to"] == good
    assert any(s == 500 and v is None for s, v in load.results)  # the bad version really failed
    tail = load.results[-20:]
    assert all(s == 200 and v == good for s, v in tail), tail
    assert [e.kind for e in live.events[-2:]] == ["rollout", "rollback"]
    assert live.reg.rollout_state().serving == good


def test_p99_rollback_through_live_traffic(live: Live) -> None:
    """Honest about the trigger: the new version is a normal one, and this controller's p99 limit
    (0.01 ms) is below what any real request takes, so live latencies trip it."""
    ctl = live.controller(**{**LOOSE, "max_p99_ms": 0.01})
    good = live.reg.champion()
    new = add_version(live.reg, 101)
    live.reg.set_champion(new, "normal version")
    with Load(live.url, threads=2) as load:
        ev = ctl.step()
        assert ev is not None and ev.version == new
        drive(ctl, lambda: live.reg.champion() == good, timeout=120)
    last = live.reg.decisions()[-1]
    assert last["decision"] == "rollback" and last["version"] == new, last
    assert "p99 latency" in last["reason"] and "> 0 ms" in last["reason"]
    assert all(s == 200 for s, _ in load.results)  # slow, not failing
    assert live.reg.champion() == good


def _serve_users(live: Live, users: list[str]) -> dict[str, list[str]]:
    served: dict[str, list[str]] = {}
    with httpx.Client(timeout=10) as c:
        for u in users:
            r = c.post(f"{live.url}/recommend", json={"user_id": u, "k": 5})
            assert r.status_code == 200, r.text
            served[u] = [i["item_id"] for i in r.json()["items"]]
    return served


def _click(live: Live, served: dict[str, list[str]]) -> None:
    now = int(time.time() * 1000)
    events = [
        Event(event_id=f"clk-{u}", user_id=u, item_id=items[0], event_type=EventType.CLICK, ts=now)
        for u, items in served.items()
    ]
    replay(events, live.kafka, live.topics.events)  # type: ignore[attr-defined]


def test_click_through_rollback_from_kafka_clicks(live: Live) -> None:
    """The previous version's users click what it served; the new version's users, in the same
    length of time right after the rollout, click nothing: click-through collapses."""
    ctl = live.controller(**{**LOOSE, "min_clicks_base": 10, "min_click_ratio": 0.5})
    good = live.reg.champion()
    tag = uuid.uuid4().hex[:6]
    before = _serve_users(live, [f"a{tag}-{i}" for i in range(40)])
    time.sleep(1.5)  # the replicas report what they served every 0.5 s
    _click(live, before)
    snap: dict[str, Any] = {}
    deadline = time.time() + 20
    while time.time() < deadline:  # the history consumer credits the clicks to `good`
        snap = ray.get(live.ctx.snapshot.remote())
        if snap["versions"].get(str(good), {}).get("clicked", 0) >= 30:
            break
        time.sleep(0.3)
    assert snap["versions"][str(good)]["clicked"] >= 30, snap["versions"]

    new = add_version(live.reg, 102)
    live.reg.set_champion(new, "offline metrics fine")
    ev = ctl.step()
    assert ev is not None and ev.version == new
    after = _serve_users(live, [f"b{tag}-{i}" for i in range(40)])
    assert all(after.values())
    drive(ctl, lambda: live.reg.champion() == good, timeout=120)
    last = live.reg.decisions()[-1]
    assert last["decision"] == "rollback" and last["version"] == new, last
    assert "click-through" in last["reason"] and "same length" in last["reason"], last
    assert live.reg.champion() == good


def test_restarted_controller_knows_serving_and_rolls_back(live: Live) -> None:
    good = live.reg.champion()
    first = live.controller(**LOOSE)
    bad = finite_version_that_breaks_at_request_time(live.reg, 103)
    live.reg.set_champion(bad, "looks fine offline")
    ev = first.step()
    assert ev is not None and ev.kind == "rollout" and ev.version == bad
    watch_since = first.watch_since
    del first  # the process running the controller dies before it judged the version

    second = live.controller(**LOOSE)
    assert (second.current, second.previous, second.watch_since) == (bad, good, watch_since)
    with Load(live.url, threads=2):
        ev = second.step()
        assert ev is not None and ev.kind == "restore" and ev.version == bad
        drive(second, lambda: live.reg.champion() == good, timeout=120)
    last = live.reg.decisions()[-1]
    assert last["decision"] == "rollback" and last["version"] == bad and last["to"] == good
    assert "error rate" in last["reason"]
    models = httpx.get(f"{live.url}/models").json()
    assert set(models["serving"].values()) <= {good}, models


def test_manual_rollback_is_followed_as_a_rollback(live: Live) -> None:
    """`streamtune rollout rollback` moves the champion back (``mark_rolled_back``); a running
    controller follows it as a rollback, so the bad version never becomes a rollback target."""
    ctl = live.controller(**LOOSE)
    good = live.reg.champion()
    new = add_version(live.reg, 104)
    live.reg.set_champion(new, "normal version")
    ev = ctl.step()
    assert ev is not None and ev.kind == "rollout" and (ctl.current, ctl.previous) == (new, good)
    live.reg.mark_rolled_back(new, "manual rollback", to=good)  # what the CLI command does
    ev = ctl.step()
    assert ev is not None and ev.kind == "rollback" and ev.version == good
    assert (ctl.current, ctl.previous) == (good, None)
    assert httpx.get(f"{live.url}/healthz").json()["version"] == good


def test_state_file_is_the_registry_s(live: Live) -> None:
    """What a restarted `up` reads: the state is in the registry, not in the test's objects."""
    fresh = Registry(live.reg.root)
    st = fresh.rollout_state()
    assert st.serving == live.reg.champion() and st.previous is None  # after the last rollback
