"""History shards without Ray or Kafka: who holds a user, a shard's rebuild of only its users,
and the click bookkeeping that moves with them."""

from __future__ import annotations

import threading
import zlib
from pathlib import Path

import pyarrow as pa
import pytest

from serving.clicks import CLICK_WINDOW_S, ClickBook, Served
from serving.config import ServingConfig
from serving.history_feed import ChangeLog
from serving.history_shard import HistoryShard, _covered
from serving.history_store import HistoryStore
from serving.shards import shard_codes, shard_of, split_by_shard
from streams.buffer import EventBuffer
from streams.config import BufferConfig
from streams.events import Event, EventType, RowBatch
from streams.offsets import OffsetRange


def test_shard_of_is_a_stable_hash_not_pythons_salted_one() -> None:
    # The same user must land on the same shard in every process and release.
    assert shard_of("user-42", 8) == zlib.crc32(b"user-42") % 8 == 3
    assert shard_of("anything", 1) == 0
    counts = [0] * 4
    for u in range(4000):
        counts[shard_of(f"u{u}", 4)] += 1
    assert min(counts) > 800  # spread, not piled on one shard


def test_shard_codes_match_shard_of_over_chunks_and_repeats() -> None:
    users = [f"u{i % 37}" for i in range(500)]
    chunked = pa.chunked_array([pa.array(users[:200]), pa.array(users[200:])])
    assert shard_codes(chunked, 5).tolist() == [shard_of(u, 5) for u in users]
    assert shard_codes(pa.array(users), 1).tolist() == [0] * 500


def test_split_by_shard_keeps_every_position_once() -> None:
    users = ["a", "b", "c", "a", "d", "e"]
    groups = split_by_shard(users, 3)
    assert sorted(p for pos in groups.values() for p in pos) == list(range(len(users)))
    for i, pos in groups.items():
        assert all(shard_of(users[p], 3) == i for p in pos)


def _events(n: int) -> RowBatch:
    rows = RowBatch()
    for o in range(n):
        e = Event(event_id=f"e{o}", user_id=f"u{o % 13}", item_id=f"i{o % 17}",
                  event_type=EventType.VIEW, ts=o)  # fmt: skip
        rows.append(e, "t", 0, o)
    return rows


def _bare_shard(index: int, shards: int, length: int) -> HistoryShard:
    """The shard's state only (its constructor starts a Kafka consumer)."""
    shard = HistoryShard.__new__(HistoryShard)
    shard.index, shard.shards = index, shards
    shard.lock = threading.Lock()
    shard._changed = threading.Condition(shard.lock)
    shard.cfg = ServingConfig(history_len=length)
    shard.history = HistoryStore(length)
    shard.feed = ChangeLog(1000)
    shard.clicks = ClickBook()
    shard.events_seen = 0
    return shard


@pytest.mark.parametrize("shards", [1, 3])
def test_each_shard_rebuilds_only_its_users_from_the_buffer(tmp_path: Path, shards: int) -> None:
    buf = EventBuffer(BufferConfig(path=tmp_path / "buf"))
    buf.append(_events(400).to_table(), [OffsetRange("t", 0, 0, 400)])
    whole = HistoryStore(10)
    for o in range(400):
        whole.push(f"u{o % 13}", f"i{o % 17}")
    held: set[str] = set()
    for i in range(shards):
        shard = _bare_shard(i, shards, 10)
        start, source = shard._rebuild(buf, registry=None)
        assert start == {("t", 0): 400} and "whole buffer" in source
        mine = {f"u{u}" for u in range(13) if shard_of(f"u{u}", shards) == i}
        assert set(shard.history._row) == mine
        for u in mine:
            assert shard.get_history(u) == whole.get(u)
        held |= mine
    assert held == {f"u{u}" for u in range(13)}


def test_an_index_is_used_only_if_the_buffer_holds_everything_after_it() -> None:
    assert _covered({"t:0": 5, "t:1": 0}, {"t:0": 9, "t:1": 3})
    assert not _covered({"t:0": 5}, {"t:0": 4})  # the buffer was reset behind the index
    assert not _covered({"t:0": 5}, {})


def test_clicks_credit_the_version_that_served_the_item_once() -> None:
    book = ClickBook()
    book.record_served({"u": Served(["a", "b"], "3"), "w": Served(["c"], "4")}, now=1000.0)
    book.on_event("u", "a", "click", now=1001.0)
    book.on_event("u", "a", "purchase", now=1002.0)  # the same served item: one click
    book.on_event("u", "b", "view", now=1003.0)  # not an engagement
    book.on_event("w", "c", "click", now=1000.0 + CLICK_WINDOW_S + 1)  # too late
    assert book.totals(["3", "4", "9"]) == {"3": (2, 1), "4": (1, 0)}
    assert book.window("3", 999.0, 1001.0) == {"served": 2, "clicked": 1, "ctr": 0.5}


def test_answers_past_the_click_window_are_forgotten() -> None:
    book = ClickBook()
    book.record_served({"old": Served(["a"], "1")}, now=0.0)
    book.record_served({"new": Served(["b"], "1")}, now=CLICK_WINDOW_S - 1)
    book.forget(now=CLICK_WINDOW_S + 1)
    assert list(book.served) == ["new"]


def test_a_shard_rebuilds_from_the_newest_index_plus_the_buffer_tail(tmp_path: Path) -> None:
    from training.config import ModelConfig
    from training.histories import save_chain
    from training.model import Recommender, save_weights
    from training.registry import Registry
    from training.vocab import ItemVocab

    buf = EventBuffer(BufferConfig(path=tmp_path / "buf"))
    buf.append(_events(400).to_table(), [OffsetRange("t", 0, 0, 400)])
    # The index says what rounds over the first 300 events trained on: deliberately not what
    # those events hold, so the test tells the index's items from the buffer's.
    vocab = ItemVocab(["x", "y", "z"])
    users = [f"u{u}" for u in range(13)]
    index = pa.table({
        "user_id": users,
        "recent": pa.array([[1, 2]] * 13, pa.list_(pa.int32())),  # rows of "x", "y"
        "seen": pa.array([[1, 2]] * 13, pa.list_(pa.int32())),
    })  # fmt: skip
    cfg = ModelConfig(max_len=10, d_model=16)

    def write(d: Path) -> None:
        save_weights(Recommender(cfg, len(vocab)), d / "model.safetensors")
        vocab.save(d / "vocab.json")
        save_chain(index, d, None)

    reg = Registry(tmp_path / "reg")
    reg.register(write, {"model_config": cfg.model_dump(), "watermark": {"t:0": 300}})
    tail = HistoryStore(10)
    for u in users:
        tail.push(u, "x")
        tail.push(u, "y")
    for o in range(300, 400):
        tail.push(f"u{o % 13}", f"i{o % 17}")
    for i in range(2):
        shard = _bare_shard(i, 2, 10)
        start, source = shard._rebuild(buf, registry=reg)
        assert start == {("t", 0): 400} and "v1's history index + " in source
        for u in users:
            assert shard.get_history(u) == (tail.get(u) if shard_of(u, 2) == i else [])


def test_replicas_and_shards_go_to_the_marked_serving_nodes() -> None:
    """One rule places both (``ServingConfig.on_serving_nodes``): the marker's share when the
    serving nodes are marked, no resource otherwise."""
    assert ServingConfig().on_serving_nodes() == {}
    marked = ServingConfig(node_resource="streamtune_serve")
    assert marked.on_serving_nodes() == {"streamtune_serve": 0.001}
