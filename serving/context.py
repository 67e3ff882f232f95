"""ServingContext: the live state the replicas share, as one Ray actor.

* Fresh user history: rebuilt from the buffer at start, then fed from Kafka (``streams.tail``)
  from the buffer's next offsets, so nothing is counted twice or missed, bounded per user, in a
  compact store (``serving.history_store``: no cap on users unless ``serving.history_users`` is
  set, then the least recently active go). Every event applied is also numbered in a change feed
  that the replicas' own caches follow (``serving.history_feed``): a replica calls here only for
  users it does not hold yet.
* Online quality: which items each user was just served, by which version, and whether the user
  then clicked one of them (click, cart or purchase events on a served item within ten minutes).
* Per-version serving stats reported by replicas (requests, errors, latencies) and which version
  each replica serves; the rollout controller judges versions from these.

Click-through is also kept per version in one-second buckets of *impression* time (a click is
credited to the bucket in which its item was served), so two versions can be compared over the
same stretch of time: ``window(version, since, until)`` returns the items a version served in
``[since, until)`` and how many of those were clicked. The rollout controller compares the new
version over the window since its rollout with the previous version over a window of equal
length ending now (so: the time just before the rollout, plus any overlap in which it still
served); see ``serving.rollout``. Buckets older than ``BUCKET_KEEP_S`` are dropped.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from typing import Any

import ray

from serving.config import ServingConfig
from serving.history_feed import ChangeLog, Changes, Read
from serving.history_store import HistoryStore
from streams.buffer import EventBuffer
from streams.config import BufferConfig, KafkaConfig, TopicsConfig
from streams.errors import StreamtuneError
from streams.offsets import tp_key
from streams.tail import EventTail

log = logging.getLogger(__name__)

ENGAGED = {"click", "cart", "purchase"}
CLICK_WINDOW_S = 600.0
CONTEXT_ACTOR = "streamtune-serving-context"
# Every control-plane actor lives here, so a Serve app deployed by another job finds them.
CONTROL_NAMESPACE = "streamtune"
BUCKET_S = 1.0
BUCKET_KEEP_S = 3 * 3600.0
# A snapshot asked for no versions in particular carries the live replicas' versions and this many
# of the most recently active others.
SNAPSHOT_RECENT = 10
# Replicas waiting for a rollout announcement hold a thread each, for up to serving.follow_s:
# they get threads of their own, so however many replicas wait, history lookups never queue
# behind them. Past this many replicas, a wait queues for at most follow_s before it starts.
HINT_THREADS = 128
# Replicas following the history feed (``changes_since``) hold a thread each while they wait for
# a change, for up to serving.follow_s: threads of their own too, for the same reason.
FEED_THREADS = 128


class VersionStats:
    def __init__(self) -> None:
        self.requests = 0
        self.errors = 0
        self.latencies: deque[float] = deque(maxlen=5000)
        self.served = 0
        self.clicked = 0
        self.first_seen = self.last_active = time.time()
        # bucket index (impression time // BUCKET_S) -> [served, clicked]
        self.buckets: dict[int, list[int]] = {}

    def add_served(self, n: int, at: float) -> None:
        self.last_active = max(self.last_active, at)
        self.served += n
        self.buckets.setdefault(int(at // BUCKET_S), [0, 0])[0] += n

    def add_click(self, served_at: float) -> None:
        self.last_active = time.time()
        self.clicked += 1
        self.buckets.setdefault(int(served_at // BUCKET_S), [0, 0])[1] += 1

    def window(self, since: float, until: float) -> dict[str, float]:
        lo, hi = int(since // BUCKET_S), int(until // BUCKET_S)
        served = clicked = 0
        for b, (s, c) in self.buckets.items():
            if lo <= b <= hi:
                served, clicked = served + s, clicked + c
        return {"served": served, "clicked": clicked,
                "ctr": clicked / served if served else 0.0}  # fmt: skip

    def forget_before(self, t: float) -> None:
        cut = int(t // BUCKET_S)
        for b in [b for b in self.buckets if b < cut]:
            del self.buckets[b]

    def summary(self) -> dict[str, float]:
        lat = sorted(self.latencies)
        p99 = lat[min(len(lat) - 1, int(0.99 * len(lat)))] if lat else 0.0
        return {
            "requests": self.requests,
            "errors": self.errors,
            "error_rate": self.errors / self.requests if self.requests else 0.0,
            "p99_ms": p99,
            "served": self.served,
            "clicked": self.clicked,
            "ctr": self.clicked / self.served if self.served else 0.0,
        }


def chosen_versions(stats: dict[str, VersionStats], live: set[str],
                    asked: list[str] | None) -> list[str]:  # fmt: skip
    """Whose stats a snapshot carries: those ``asked`` for, or (None) the ``live`` replicas'
    versions and the ``SNAPSHOT_RECENT`` most recently active others. Never every version ever
    served: with a round every few seconds that list grows by thousands an hour, and each
    snapshot (the rollout controller takes several a second) held the lock that history look-ups
    wait on for longer and longer."""
    if asked is not None:
        return [v for v in asked if v in stats]
    recent = set(sorted(stats, key=lambda v: stats[v].last_active)[-SNAPSHOT_RECENT:])
    return [v for v in stats if v in live or v in recent]


def _versions_of(replicas: dict[str, dict[str, Any]]) -> set[str]:
    return {str(d["version"]) for d in replicas.values()}


def forget_versions(stats: dict[str, VersionStats], live: set[str], now: float) -> None:
    """Drop the stats of versions no live replica serves and nothing touched for
    ``BUCKET_KEEP_S`` (their click windows are empty by then): they would pile up forever."""
    for v in [v for v, st in stats.items()
              if v not in live and st.last_active < now - BUCKET_KEEP_S]:  # fmt: skip
        del stats[v]
    for st in stats.values():
        st.forget_before(now - BUCKET_KEEP_S)


class ServingContext:
    """Run as a named, detached-capable Ray actor (see ``start_context``)."""

    def __init__(
        self, kafka: dict[str, Any], topics: dict[str, Any], buffer: dict[str, Any] | None,
        cfg: dict[str, Any],
    ) -> None:  # fmt: skip
        self.kafka = KafkaConfig(**kafka)
        self.topics = TopicsConfig(**topics)
        self.cfg = ServingConfig(**cfg)
        self.lock = threading.Lock()
        # Every event applied after the rebuild, numbered, for the replicas' caches to follow.
        self.feed = ChangeLog(self.cfg.history_feed_len)
        self._changed = threading.Condition(self.lock)
        self.history = HistoryStore(self.cfg.history_len, self.cfg.history_users)
        self.served: dict[str, tuple[str, set[str], float]] = {}  # user -> (version, items, t)
        self.stats: dict[str, VersionStats] = {}
        self.replicas: dict[str, dict[str, Any]] = {}
        self.load_failures: dict[str, str] = {}
        self._forgot_at = time.time()
        # Rollout announcements: a counter the replicas' followers wait on (see ``announce``).
        self._announced = threading.Condition()
        self.announcements = 0
        self.events_seen = 0
        self.last_event_at: float | None = None
        self.tail_error: str | None = None
        start = self._rebuild(BufferConfig(**buffer)) if buffer else None
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._consume, args=(start,), daemon=True)
        self._thread.start()
        self._ready.wait(timeout=30)

    # -- history ------------------------------------------------------------------------
    def _rebuild(self, bcfg: BufferConfig) -> dict[tuple[str, int], int]:
        """Histories from the buffer up to a snapshot of its offsets, which the tail then
        resumes from. (Read first and snapshot after, and whatever ingest flushed in between,
        seconds on object storage, was in neither: seen as a cluster's history with no users.)"""
        buf = EventBuffer(bcfg)
        upto = buf.next_offsets()
        table = buf.read(upto={tp_key(t, p): o for (t, p), o in upto.items()},
                         columns=["user_id", "item_id"])  # fmt: skip
        # One vectorised load (each user's last items straight into its ring), not a push per
        # event: the buffer holds every event ever ingested.
        self.history.load(table.column("user_id").combine_chunks(),
                          table.column("item_id").combine_chunks())  # fmt: skip
        return upto

    def _push(self, user: str, item: str) -> None:
        self.history.push(user, item)

    def _consume(self, start: dict[tuple[str, int], int] | None) -> None:
        while True:
            try:
                tail = EventTail(self.kafka, self.topics, self.cfg.history_group, start)
                break
            except StreamtuneError as err:
                # Answers fall back to popularity meanwhile; the error is on the status page.
                self.tail_error = str(err)
                log.warning("history tail not started (retrying in 5 s): %s", err)
                if self._stop.wait(5):
                    return
        self.tail_error = None
        self._ready.set()
        while not self._stop.is_set():
            for e in tail.poll(timeout_ms=100):
                self._on_event(e.user_id, e.item_id, e.event_type.value)
        tail.close()

    def _on_event(self, user: str, item: str, kind: str) -> None:
        with self.lock:
            self._push(user, item)
            self.feed.append(user, item)
            self._changed.notify_all()
            self.events_seen += 1
            self.last_event_at = time.time()
            served = self.served.get(user)
            if kind in ENGAGED and served is not None:
                version, items, t = served
                if item in items and time.time() - t < CLICK_WINDOW_S:
                    self._stats(version).add_click(served_at=t)
                    items.discard(item)  # one click per served item

    def get_history(self, user: str) -> list[str]:
        with self.lock:
            return self.history.get(user)

    def get_histories(self, users: list[str]) -> list[list[str]]:
        """``get_history`` of each user, in order: one call for a replica's whole batch."""
        return self.histories_at(users).histories

    def histories_at(self, users: list[str]) -> Read:
        """``get_histories`` with the feed position they were read at (``serving.history_feed``)."""
        with self.lock:
            hist = [self.history.get(u) for u in users]
            return Read(self.feed.epoch, self.feed.seq, hist)

    @ray.method(concurrency_group="history_feed")
    def changes_since(self, epoch: str | None, seq: int, wait_s: float) -> Changes:
        """The changes after a replica's cursor; waits up to ``wait_s`` for one when there are
        none yet (a long poll: a change reaches the replicas as soon as it is applied)."""
        with self._changed:
            if epoch == self.feed.epoch and seq == self.feed.seq:
                self._changed.wait(wait_s)
            return self.feed.since(epoch, seq)

    # -- serving stats ------------------------------------------------------------------
    def _stats(self, version: str) -> VersionStats:
        s = self.stats.get(version)
        if s is None:
            s = self.stats[version] = VersionStats()
        return s

    def report(
        self, replica: str, version: str | None, requests: dict[str, list[tuple[float, bool]]],
        served: dict[str, tuple[str, list[str]]], counters: dict[str, int] | None = None,
    ) -> None:  # fmt: skip
        """A replica's batch since its last report: per version (latency_ms, ok) samples, per
        user the items it was just served, and its counters (history cache, batches)."""
        with self.lock:
            now = time.time()
            self.replicas[replica] = {"version": version, "at": now, "counters": counters}
            for v, samples in requests.items():
                st = self._stats(v)
                st.last_active = now
                for latency, ok in samples:
                    st.requests += 1
                    st.errors += 0 if ok else 1
                    st.latencies.append(latency)
            for user, (v, items) in served.items():
                self.served[user] = (v, set(items), now)
                self._stats(v).add_served(len(items), at=now)
            if now - self._forgot_at > 60:
                self._forgot_at = now
                forget_versions(self.stats, _versions_of(self._live_replicas(now)), now)

    # -- rollout hints --------------------------------------------------------------------
    def announce(self) -> None:
        """The rollout controller recorded a new serving version in the registry: wake every
        replica's follower now instead of at its next ``follow_s`` poll. Only a hint: the
        replicas read the version from the registry, which stays the one record of it."""
        with self._announced:
            self.announcements += 1
            self._announced.notify_all()

    @ray.method(concurrency_group="rollout_hints")
    def await_announcement(self, seen: int, timeout_s: float) -> int:
        """Blocks until the announcement counter differs from ``seen`` or ``timeout_s`` passes;
        returns the counter (pass -1 to learn it at once)."""
        with self._announced:
            self._announced.wait_for(lambda: self.announcements != seen, timeout=timeout_s)
            return self.announcements

    def record_load_failure(self, version: str, reason: str) -> None:
        with self.lock:
            self.load_failures[version] = reason

    def window(self, version: str, since: float, until: float) -> dict[str, float]:
        """Items ``version`` served in ``[since, until)`` (unix seconds, bucketed) and clicks on
        them."""
        with self.lock:
            st = self.stats.get(version)
            if st is None:
                return {"served": 0, "clicked": 0, "ctr": 0.0}
            return st.window(since, until)

    def _live_replicas(self, now: float) -> dict[str, dict[str, Any]]:
        """Replicas that reported in the last 30 s."""
        return {r: d for r, d in self.replicas.items() if now - d["at"] < 30}

    def snapshot(self, versions: list[str] | None = None) -> dict[str, Any]:
        """Replicas, load failures, the history's size and the stats of ``versions`` (None: the
        live ones and the most recently active others; ``[]``: none, the cheapest call)."""
        with self.lock:
            now = time.time()
            live = self._live_replicas(now)
            chosen = chosen_versions(self.stats, _versions_of(live), versions)
            return {
                "replicas": live,
                "versions": {v: self.stats[v].summary() for v in chosen},
                "load_failures": dict(self.load_failures),
                "history_users": len(self.history),
                "events_seen": self.events_seen,
                "last_event_at": self.last_event_at,
                "tail_error": self.tail_error,
            }

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def start_context(
    kafka: KafkaConfig, topics: TopicsConfig, buffer: BufferConfig | None, cfg: ServingConfig
) -> Any:
    """Start (or find) the named, detached context actor; returns its handle.

    On a cluster it runs on the head node (the control plane's place); Ray restarts it when its
    process dies, and it rebuilds users' histories from the buffer then.
    """
    actor_cls = ray.remote(  # type: ignore[call-overload]
        num_cpus=0,
        max_concurrency=64,
        concurrency_groups={"rollout_hints": HINT_THREADS, "history_feed": FEED_THREADS},
    )(ServingContext)
    return actor_cls.options(
        name=CONTEXT_ACTOR,
        namespace=CONTROL_NAMESPACE,
        get_if_exists=True,
        lifetime="detached",
        max_restarts=-1,
        resources=on_head(),
    ).remote(
        kafka.model_dump(),
        topics.model_dump(),
        buffer.model_dump() if buffer else None,
        cfg.model_dump(),
    )


def find_context() -> Any:
    """The running context actor's handle, or None if there is none (yet)."""
    try:
        return ray.get_actor(CONTEXT_ACTOR, namespace=CONTROL_NAMESPACE)
    except ValueError:
        return None


def on_head() -> dict[str, float]:
    """A resource request that only the head node satisfies (Ray gives the head this one)."""
    from ray._common.constants import HEAD_NODE_RESOURCE_NAME

    return {HEAD_NODE_RESOURCE_NAME: 0.001}
