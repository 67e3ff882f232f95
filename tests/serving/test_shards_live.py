"""History shards for real: three shard actors on Ray, fed by a real Kafka broker, rebuilt from a
real buffer; one is killed and rebuilds only its users while the others keep answering."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import ray

from serving.config import ServingConfig
from serving.context import CONTROL_NAMESPACE, start_context
from serving.history_store import HistoryStore
from serving.shards import find_shard, shard_of
from streams.admin import ensure_topics
from streams.buffer import EventBuffer
from streams.config import BufferConfig, KafkaConfig, TopicsConfig
from streams.events import Event, EventType, RowBatch
from streams.offsets import OffsetRange
from streams.producer import replay

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SHARDS, USERS, BUFFERED = 3, 30, 600


def _event(o: int) -> Event:
    return Event(event_id=f"e{o}", user_id=f"u{o % USERS}", item_id=f"i{(o * 7) % 41}",
                 event_type=EventType.VIEW, ts=1_700_000_000_000 + o)  # fmt: skip


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory, kafka: KafkaConfig) -> Iterator[dict[str, Any]]:
    topics = TopicsConfig(events="shards.events", dead_letter="shards.dlq", partitions=1)
    ensure_topics(kafka, topics)
    events = [_event(o) for o in range(BUFFERED)]
    assert replay(events, kafka, topics.events) == BUFFERED  # offsets 0..599, as buffered
    bcfg = BufferConfig(path=Path(tmp_path_factory.mktemp("shards")) / "buf")
    rows = RowBatch()
    for o, e in enumerate(events):
        rows.append(e, topics.events, 0, o)
    EventBuffer(bcfg).append(rows.to_table(), [OffsetRange(topics.events, 0, 0, BUFFERED)])
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    cfg = ServingConfig(history_shards=SHARDS, history_len=10)
    ctx = start_context(kafka, topics, bcfg, cfg)
    yield {"ctx": ctx, "kafka": kafka, "topics": topics, "events": events}
    ray.shutdown()


def _expected(events: list[Event]) -> HistoryStore:
    store = HistoryStore(10)
    for e in events:
        store.push(e.user_id, e.item_id)
    return store


def _shard(i: int) -> Any:
    h = find_shard(i, SHARDS, CONTROL_NAMESPACE)
    assert h is not None, f"shard {i} not running"
    return h


def _await(cond: Any, what: str, timeout: float = 60) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = cond()
        if got:
            return got
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def test_every_user_is_held_by_exactly_its_shard(live: dict[str, Any]) -> None:
    ctx, expected = live["ctx"], _expected(live["events"])
    snap = _await(lambda: (s := ray.get(ctx.snapshot.remote([])))["history_users"] == USERS
                  and s, "every shard rebuilt")  # fmt: skip
    assert [s["users"] for s in snap["shards"]] == [
        sum(shard_of(f"u{u}", SHARDS) == i for u in range(USERS)) for i in range(SHARDS)
    ]
    for u in range(USERS):
        user = f"u{u}"
        assert ray.get(ctx.get_history.remote(user)) == expected.get(user)
        other = (shard_of(user, SHARDS) + 1) % SHARDS
        assert ray.get(_shard(other).get_history.remote(user)) == []  # not held twice


def test_a_killed_shard_rebuilds_only_its_users_while_the_others_serve(
    live: dict[str, Any],
) -> None:
    ctx, events = live["ctx"], list(live["events"])
    epochs = [ray.get(_shard(i).changes_since.remote(None, 0, 0.0)).epoch for i in range(SHARDS)]
    victim = 1
    mine = [f"u{u}" for u in range(USERS) if shard_of(f"u{u}", SHARDS) == victim]
    others = [f"u{u}" for u in range(USERS) if shard_of(f"u{u}", SHARDS) != victim]
    ray.kill(_shard(victim), no_restart=False)  # Ray restarts it under the same name
    # The other shards answer throughout, from the same incarnation (epoch) as before.
    expected = _expected(events)
    for u in others:
        assert ray.get(ctx.get_history.remote(u), timeout=10) == expected.get(u)
    for i in set(range(SHARDS)) - {victim}:
        assert ray.get(_shard(i).changes_since.remote(None, 0, 0.0)).epoch == epochs[i]

    def restarted() -> Any:
        try:
            st = ray.get(_shard(victim).status.remote(), timeout=5)
        except Exception:
            return None
        new_epoch = ray.get(_shard(victim).changes_since.remote(None, 0, 0.0)).epoch
        return st if new_epoch != epochs[victim] else None

    status = _await(restarted, "the killed shard to come back")
    assert status["users"] == len(mine) and "whole buffer" in status["rebuilt_from"]
    for u in mine:
        assert ray.get(ctx.get_history.remote(u)) == expected.get(u)
    # And it follows the stream again from where its rebuild ended.
    fresh = Event(event_id="fresh", user_id=mine[0], item_id="brand-new",
                  event_type=EventType.CLICK, ts=1_800_000_000_000)  # fmt: skip
    replay([fresh], live["kafka"], live["topics"].events)
    _await(lambda: ray.get(ctx.get_history.remote(mine[0]))[-1:] == ["brand-new"],
           "the restarted shard to see a new event")  # fmt: skip
