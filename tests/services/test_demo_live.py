"""The demo's simulated users (``services.demo_live``): who asks, what they click, and the
report of the live trials read back from a real registry. No broker: clicks are made, not sent."""

from __future__ import annotations

from pathlib import Path

from services.click_model import ClickModel
from services.demo_live import DemoClicks, live_record
from streams.config import KafkaConfig
from streams.events import Event
from training.registry import LiveTrial, Registry, RolloutState


def _events(pairs: list[tuple[str, str]]) -> list[Event]:
    return [
        Event(event_id=f"e{i}", user_id=u, item_id=it, event_type="rating", ts=1000 + i)
        for i, (u, it) in enumerate(pairs)
    ]


def _clicks(window: int = 2) -> DemoClicks:
    ev = _events([("a", "1"), ("b", "2"), ("a", "3"), ("a", "4"), ("b", "5"), ("a", "6")])
    model = ClickModel(window=window, eta=0.0)  # every position examined: clicks = relevance
    return DemoClicks(ev, model, KafkaConfig(bootstrap_servers="127.0.0.1:1"), "t")


def test_the_user_of_the_next_event_asks_and_its_future_starts_there() -> None:
    c = _clicks()
    assert [c.asker(n) for n in range(6)] == ["a", "b", "a", "a", "b", "a"]
    assert c.asker(99) == "a"  # past the end: the last event's user
    assert c.future("a", 0) == ["1", "3"]  # the request's own event first, then `window` in all
    assert c.future("a", 1) == ["3", "4"]
    assert c.future("a", 6) == [] and c.future("nobody", 0) == []


def test_clicks_are_the_shown_items_in_the_users_near_future_and_wait_their_delay() -> None:
    c = _clicks()
    c.answered("a", ["9", "4", "3", "1"], published=1)  # future of a from 1: 3, 4
    c.answered("b", ["7"], published=1)  # future of b: 2, 5 -> nothing clicked
    assert (c.answers, c.clicked) == (2, 2)
    made = [e for _, batch in c._due for e in batch]
    assert sorted(e.item_id for e in made) == ["3", "4"]
    assert {(e.user_id, e.event_type) for e in made} == {("a", "click")}
    c.delay_s = 3600.0
    c.send_due()  # nothing due yet: no producer is made (the broker above does not exist)
    assert c.sent == 0 and c._producer is None


def test_live_record_reports_decisions_and_the_running_trial(tmp_path: Path) -> None:
    reg = Registry(tmp_path / "reg")
    reg.record(3, "promote", "gate passed")
    reg.record(5, "live-verified", "live-verified by trial t1", impressions=40)
    trial = LiveTrial(id="t2", mode="guard", a=5, b=8, b_versions=[6, 8], share=0.2)
    reg.set_rollout_state(RolloutState(serving=8, trial=trial, baseline=5))
    got = live_record(reg, "guard", _clicks(), reg.rollout_state().trial)
    assert [d["decision"] for d in got["decisions"]] == ["live-verified"]
    assert got["decisions"][0]["impressions"] == 40
    assert got["running"]["id"] == "t2" and got["running"]["b_versions"] == [6, 8]
    assert got["click_model"] == {"window": 2, "eta": 0.0} and got["clicks_sent"] == 0
    assert live_record(reg, "off", None, None)["answers"] is None  # not measured: null, not 0
