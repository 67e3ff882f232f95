"""Live trials end to end: interleaved answers from a real Ray Serve app, clicks from real Kafka
events, and the rollout controller acting on the sequential test (``rollout.live``).

Simulated users click the best item team a contributed to their answer (never b's), so b loses
every decisive impression: canary discards b, guard rolls back to the baseline and pauses.
"""

from __future__ import annotations

import random
import time
import uuid
from typing import Any

import httpx
import pytest

from serving.rollout import RolloutController
from streams.events import Event, EventType
from streams.producer import replay
from tests.serving.conftest import LOOSE, Live, drive
from tests.serving.test_serving_live import ITEMS, add_version

pytestmark = [pytest.mark.integration, pytest.mark.slow]

# b loses every decisive impression: 28 decide at alpha 0.05 with the default prior
USERS = 40


def _answers(live: Live, users: list[str]) -> dict[str, dict[str, Any]]:
    """Each user's answer over a history of its own: with none, both versions would answer by
    popularity alike, every pick shared and no impression decisive."""
    out = {}
    with httpx.Client(timeout=10) as c:
        for u in users:
            history = random.Random(u).sample(ITEMS, 3)
            r = c.post(f"{live.url}/recommend", json={"user_id": u, "history": history, "k": 6})
            assert r.status_code == 200, r.text
            out[u] = r.json()
    return out


def _await_interleaving(live: Live, ctl: RolloutController, trial: str) -> None:
    """Until every replica interleaves for ``trial`` (each loads the other version first)."""
    deadline = time.time() + 60
    while time.time() < deadline:
        got = _answers(live, [f"probe-{i}" for i in range(8)])
        if all(a["trial"] == trial for a in got.values()):
            return
        ctl.step()
        time.sleep(0.3)
    raise AssertionError(f"replicas did not interleave for trial {trial}")


def _click_team_a(live: Live, answers: dict[str, dict[str, Any]], a: int) -> int:
    now = int(time.time() * 1000)
    events = []
    for u, ans in answers.items():
        mine = [it["item_id"] for it in ans["items"] if it["version"] == a]
        if mine:
            events.append(Event(event_id=f"clk-{uuid.uuid4().hex[:8]}", user_id=u,
                                item_id=mine[0], event_type=EventType.CLICK, ts=now))  # fmt: skip
    replay(events, live.kafka, live.topics.events)  # type: ignore[attr-defined]
    return len(events)


def _play(live: Live, ctl: RolloutController, trial: str, a: int) -> None:
    """One round of users served interleaved answers, clicking a's items; then each is served
    again, which settles the first impression (the history shard saw the click by then)."""
    tag = uuid.uuid4().hex[:6]
    users = [f"{tag}-{i}" for i in range(USERS)]
    first = _answers(live, users)
    assert all(ans["trial"] == trial for ans in first.values())
    # an item names the version that contributed it, none where both picked it (shared)
    assert all(it["version"] in (a, ctl.trial.b if ctl.trial else None, None)
               for ans in first.values() for it in ans["items"])  # fmt: skip
    time.sleep(1.0)  # replicas report what they served every 0.5 s
    assert _click_team_a(live, first, a) == USERS
    time.sleep(3.0)  # the shards' consumer sees the clicks
    _answers(live, users)
    time.sleep(1.0)


def test_canary_discards_a_candidate_that_loses_interleaved_traffic(live: Live) -> None:
    ctl = live.controller(**LOOSE, live="canary", live_share=1.0)
    a = live.reg.champion()
    assert a is not None
    ctl.step()  # a new controller: re-points Serve at what it serves (a restore)
    b = add_version(live.reg, 201)
    live.reg.set_champion(b, "passed the offline gate")
    ev = ctl.step()
    assert ev is not None and ev.kind == "trial" and ev.version == b
    assert live.reg.rollout_state().serving == a  # b is not rolled out
    trial = live.reg.rollout_state().trial
    assert trial is not None and (trial.a, trial.b) == (a, b)
    _await_interleaving(live, ctl, trial.id)
    _play(live, ctl, trial.id, a)
    drive(ctl, lambda: live.reg.champion() == a, timeout=30)
    assert live.reg.champion() == a and live.reg.rollout_state().serving == a
    kinds = [(d["decision"], d["version"]) for d in live.reg.decisions()[-2:]]
    assert kinds == [("live-b_worse", b), ("rollback", b)], kinds
    assert "b won 0" in live.reg.decisions()[-1]["reason"]
    assert live.events[-1].kind == "discard" and live.reg.rollout_state().trial is None


def test_guard_pools_the_lineage_rolls_back_to_the_baseline_and_pauses(live: Live) -> None:
    # the click-through watch would also see b's collapse: left out, so the guard is what acts
    ctl = live.controller(**LOOSE, live="guard", live_share=1.0, baseline_age_s=0,
                          min_clicks_base=10**6)  # fmt: skip
    base = live.reg.champion()
    assert base is not None
    ctl.step()  # the restore
    ctl.step()
    assert ctl.baseline == base
    new = add_version(live.reg, 202)
    live.reg.set_champion(new, "passed the offline gate")
    ev = ctl.step()  # guard does not hold a champion back: it is rolled out ...
    assert ev is not None and ev.kind == "rollout" and ev.version == new
    ctl.step()  # ... and put on trial against the baseline
    trial = live.reg.rollout_state().trial
    assert trial is not None and (trial.mode, trial.a, trial.b) == ("guard", base, new)
    # the next round's champion rolls out too and joins b's side of the same trial
    next_ = add_version(live.reg, 204)
    live.reg.set_champion(next_, "passed the offline gate")
    ev = ctl.step()
    assert ev is not None and ev.kind == "rollout" and ev.version == next_
    ctl.step()
    assert ctl.trial is not None and ctl.trial.id == trial.id
    assert ctl.trial.b_versions == [new, next_]
    _await_interleaving(live, ctl, trial.id)
    _play(live, ctl, trial.id, base)
    drive(ctl, lambda: live.reg.rollout_state().serving == base, timeout=30)
    state = live.reg.rollout_state()
    assert state.serving == base and live.reg.champion() == base
    assert state.paused_until is not None and state.paused_until > time.time()
    assert state.paused_reason is not None and "baseline" in state.paused_reason
    last = live.reg.decisions()[-1]
    assert last["decision"] == "rollback" and last["version"] == next_ and last["to"] == base
    assert "the baseline" in last["reason"] and "b won 0" in last["reason"], last
    assert f"v{new}, v{next_} (pooled)" in last["reason"], last
    # a champion arriving while promotions are paused is not rolled out
    newer = add_version(live.reg, 203)
    live.reg.set_champion(newer, "passed the offline gate")
    assert ctl.step() is None and live.reg.rollout_state().serving == base
    # an operator's promotion ends the pause
    live.reg.set_champion(newer, "checked by hand", decision="manual-promote")
    ev = ctl.step()
    assert ev is not None and ev.kind == "rollout" and ev.version == newer
    assert live.reg.rollout_state().paused_until is None
