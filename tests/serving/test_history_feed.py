"""The history feed's protocol: a replica's cache equals the component's histories, whatever the
order in which feed polls and reads of missing users land (no Ray: both sides are plain)."""

from __future__ import annotations

import random
from collections import OrderedDict, deque

from serving.history_feed import ChangeLog, Read, ReplicaHistories

LEN = 5


class Component:
    """The component's state as ``serving.context`` keeps it: histories and the feed."""

    def __init__(self, feed_len: int = 1000) -> None:
        self.history: OrderedDict[str, deque[str]] = OrderedDict()
        self.feed = ChangeLog(feed_len)

    def event(self, user: str, item: str) -> None:
        self.history.setdefault(user, deque(maxlen=LEN)).append(item)
        self.feed.append(user, item)

    def read(self, users: list[str]) -> Read:
        return Read(self.feed.epoch, self.feed.seq, [list(self.history.get(u, [])) for u in users])


def follow(comp: Component, cache: ReplicaHistories) -> None:
    cache.apply(comp.feed.since(cache.epoch, cache.seq))


def test_a_miss_is_read_then_followed() -> None:
    comp, cache = Component(), ReplicaHistories(100, LEN)
    follow(comp, cache)  # the first poll: a reset to the component's position
    assert cache.following and cache.seq == 0
    comp.event("u", "a")
    assert cache.lookup(["u"]) == [None]
    token = cache.begin_fill(["u"])
    assert cache.end_fill(token, ["u"], comp.read(["u"])) == [["a"]]
    comp.event("u", "b")
    follow(comp, cache)
    assert cache.lookup(["u"]) == [["a", "b"]]
    assert (cache.hits, cache.misses) == (1, 1)


def test_a_read_behind_the_feed_gets_what_the_feed_brought_meanwhile() -> None:
    comp, cache = Component(), ReplicaHistories(100, LEN)
    follow(comp, cache)
    comp.event("u", "a")
    token = cache.begin_fill(["u"])
    read = comp.read(["u"])  # read at seq 1; then the event below reaches the feed first
    comp.event("u", "b")
    follow(comp, cache)
    assert cache.end_fill(token, ["u"], read) == [["a", "b"]]
    assert cache.lookup(["u"]) == [["a", "b"]]


def test_a_read_ahead_of_the_feed_is_not_applied_twice() -> None:
    comp, cache = Component(), ReplicaHistories(100, LEN)
    follow(comp, cache)
    comp.event("u", "a")
    token = cache.begin_fill(["u"])
    assert cache.end_fill(token, ["u"], comp.read(["u"])) == [["a"]]
    follow(comp, cache)  # the feed now delivers "a", which the read already had
    assert cache.lookup(["u"]) == [["a"]]


def test_a_reset_drops_users_and_reads_begun_before_it_are_not_kept() -> None:
    comp, cache = Component(feed_len=1000), ReplicaHistories(100, LEN)
    follow(comp, cache)
    comp.event("u", "a")
    token = cache.begin_fill(["u"])
    read = comp.read(["u"])
    restarted = Component()  # a new incarnation: another epoch
    restarted.event("u", "z")
    follow(restarted, cache)
    assert len(cache) == 0 and cache.epoch == restarted.feed.epoch
    assert cache.end_fill(token, ["u"], read) == [["a"]]  # answered, but not kept
    assert cache.lookup(["u"]) == [None]


def test_a_cursor_older_than_the_log_starts_again() -> None:
    comp, cache = Component(feed_len=1000), ReplicaHistories(100, LEN)
    follow(comp, cache)
    token = cache.begin_fill(["u"])
    cache.end_fill(token, ["u"], comp.read(["u"]))
    for i in range(1500):
        comp.event("v", str(i))
    changes = comp.feed.since(cache.epoch, cache.seq)
    assert changes.items is None and changes.seq == 1500
    cache.apply(changes)
    assert len(cache) == 0 and cache.seq == 1500


def test_users_are_bounded_least_recently_asked_first() -> None:
    comp, cache = Component(), ReplicaHistories(2, LEN)
    follow(comp, cache)
    for u in ("a", "b", "c"):
        cache.end_fill(cache.begin_fill([u]), [u], comp.read([u]))
    assert len(cache) == 2 and cache.lookup(["a"]) == [None]


def test_random_interleavings_match_the_component() -> None:
    """Events, polls, and reads begun and ended in any order: every answer and every kept
    kept history equals the component's once the feed has caught up."""
    rng = random.Random(7)
    users = [f"u{i}" for i in range(6)]
    for _ in range(50):
        comp, cache = Component(feed_len=40), ReplicaHistories(4, LEN)
        follow(comp, cache)
        inflight: list[tuple[int, list[str], Read]] = []
        for step in range(300):
            op = rng.random()
            if op < 0.5:
                comp.event(rng.choice(users), str(step))
            elif op < 0.7:
                follow(comp, cache)
            elif op < 0.85:
                asked = rng.sample(users, 2)
                inflight.append((cache.begin_fill(asked), asked, comp.read(asked)))
            elif inflight:
                token, asked, read = inflight.pop(rng.randrange(len(inflight)))
                cache.end_fill(token, asked, read)
        follow(comp, cache)
        for token, asked, read in inflight:
            cache.end_fill(token, asked, read)
        follow(comp, cache)
        for u, h in zip(users, cache.lookup(users), strict=True):
            if h is not None:
                assert h == list(comp.history.get(u, [])), u
