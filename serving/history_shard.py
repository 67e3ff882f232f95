"""HistoryShard: one shard of the live state, as a Ray actor; its users are those
``serving.shards.shard_of`` maps to it.

* Fresh user history, compact (``serving.history_store``): rebuilt at start, then fed from Kafka
  (``streams.tail``) from exactly where the rebuild ended, so nothing is counted twice or missed.
  The rebuild reads the newest version's per-user history index (the items each user's rounds
  trained on, as of that version's buffer watermark) plus the buffer's tail since that watermark:
  its cost follows the events since the last round, not everything ever ingested. Without an
  index (no version yet, or no registry given) it reads the whole buffer.
* A change feed of every event applied, which the replicas' caches follow
  (``serving.history_feed``): a replica calls here only for users it does not hold yet.
* Click-through bookkeeping of its users (``serving.clicks``).

A shard that dies is restarted by Ray and rebuilds only its own users; the others keep serving,
and the replicas' caches of the restarted shard start again from its new feed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import pyarrow as pa
import ray

from serving.clicks import ClickBook, Served
from serving.config import ServingConfig
from serving.heap import freeze_startup
from serving.history_feed import ChangeLog, Changes, Read
from serving.history_store import HistoryStore
from serving.shards import shard_codes, shard_of
from streams.buffer import EventBuffer
from streams.config import BufferConfig, KafkaConfig, TopicsConfig
from streams.errors import StreamtuneError
from streams.offsets import parse_tp, tp_key
from streams.tail import EventTail
from training.errors import HistoriesError
from training.histories import CodedHistories

log = logging.getLogger(__name__)

# Replicas following the feed (``changes_since``) hold a thread each while they wait for a change,
# for up to serving.follow_s: threads of their own, so however many replicas wait, history
# look-ups never queue behind them.
FEED_THREADS = 128


class HistoryIndex:
    """What a version knows of every user's history (``histories``: each user's recent items,
    oldest first) as of the buffer offsets ``watermark`` ("topic:partition" -> next offset)."""

    def __init__(self, version: int, histories: CodedHistories, watermark: dict[str, int]) -> None:
        self.version, self.histories, self.watermark = version, histories, watermark


class HistoryShard:
    def __init__(
        self, index: int, shards: int, kafka: dict[str, Any], topics: dict[str, Any],
        buffer: dict[str, Any] | None, cfg: dict[str, Any], registry: Any = None,
    ) -> None:  # fmt: skip
        self.index, self.shards = index, shards
        self.kafka, self.topics = KafkaConfig(**kafka), TopicsConfig(**topics)
        self.cfg = ServingConfig(**cfg)
        self.lock = threading.Lock()
        self.feed = ChangeLog(self.cfg.history_feed_len)
        self._changed = threading.Condition(self.lock)
        cap = self.cfg.history_users
        self.history = HistoryStore(self.cfg.history_len, cap // shards + 1 if cap else None)
        self.clicks = ClickBook(self.cfg.settle_s)
        self.events_seen = 0
        self.last_event_at: float | None = None
        self.tail_error: str | None = None
        t0 = time.monotonic()
        start, self.rebuilt_from = None, "nothing (no buffer)"
        if buffer is not None:
            start, self.rebuilt_from = self._rebuild(EventBuffer(BufferConfig(**buffer)), registry)
        self.rebuild_s = time.monotonic() - t0
        # Freeze first: its full collection frees the rebuild's garbage, and the collection in
        # give_back_memory then walks only what is younger than the freeze.
        freeze_startup()  # the shard's start-up heap, before it follows the stream (serving.heap)
        give_back_memory()
        log.info("history shard %d/%d: %d users from %s in %.1f s", index, shards,
                 len(self.history), self.rebuilt_from, self.rebuild_s)  # fmt: skip
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._consume, args=(start,), daemon=True)
        self._thread.start()
        self._ready.wait(timeout=30)

    # -- rebuild ------------------------------------------------------------------------
    def _rebuild(self, buf: EventBuffer, registry: Any) -> tuple[dict[tuple[str, int], int], str]:
        """This shard's users' histories up to a snapshot of the buffer's offsets, which the tail
        then resumes from. (Read first and snapshot after, and whatever ingest flushed in
        between, seconds on object storage, would be in neither.)"""
        upto = buf.next_offsets()
        upto_keys = {tp_key(t, p): o for (t, p), o in upto.items()}
        index = newest_index(registry, self._keep) if registry is not None else None
        if index is not None and _covered(index.watermark, upto_keys):
            # The index as codes, grouped by user (a string per item was ~2.5 GB of peak per
            # shard at 1M users, over a cap of 8 GiB for the whole of `up`), then the tail.
            h = index.histories
            self.history.load_coded(h.users, h.offsets, h.codes, h.items)
            tail = buf.read(after=index.watermark, upto=upto_keys, columns=["user_id", "item_id"])
            tail = self._mine(tail)
            self.history.extend(tail.column("user_id").combine_chunks(),
                                tail.column("item_id").combine_chunks())  # fmt: skip
            source = f"v{index.version}'s history index + {tail.num_rows} buffered events since"
        else:
            table = self._mine(buf.read(upto=upto_keys, columns=["user_id", "item_id"]))
            self.history.load(table.column("user_id").combine_chunks(),
                              table.column("item_id").combine_chunks())  # fmt: skip
            source = f"the whole buffer ({table.num_rows} events of its users)"
        return upto, source

    def _keep(self, users: pa.Array) -> pa.Array:
        """The mask of this shard's users among ``users``."""
        return pa.array(shard_codes(users, self.shards) == self.index)

    def _mine(self, table: pa.Table) -> pa.Table:
        if self.shards <= 1:
            return table
        return table.filter(self._keep(table.column("user_id")))

    # -- the live tail --------------------------------------------------------------------
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
                if shard_of(e.user_id, self.shards) == self.index:
                    self._on_event(e.user_id, e.item_id, e.event_type.value)
        tail.close()

    def _on_event(self, user: str, item: str, kind: str) -> None:
        with self.lock:
            self.history.push(user, item)
            self.feed.append(user, item)
            self._changed.notify_all()
            self.events_seen += 1
            self.last_event_at = now = time.time()
            self.clicks.on_event(user, item, kind, now)

    # -- reads ----------------------------------------------------------------------------
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

    # -- clicks ---------------------------------------------------------------------------
    def record_served(self, served: dict[str, Served]) -> None:
        with self.lock:
            self.clicks.record_served(served, time.time())

    def trial_counts(self, trial: str) -> list[int]:
        """The live trial's impressions settled here so far: (a wins, b wins, ties, clicks
        credited to a, to b), ``serving.clicks.TALLY``."""
        with self.lock:
            return self.clicks.trial_counts(trial, time.time())

    def window(self, version: str, since: float, until: float) -> dict[str, float]:
        with self.lock:
            return self.clicks.window(version, since, until)

    def status(self, versions: list[str] | None = None) -> dict[str, Any]:
        """This shard's figures and, for ``versions``, their (served, clicked) here: one call
        per shard for a snapshot."""
        with self.lock:
            return {
                "clicks": self.clicks.totals(versions or []),
                "shard": self.index,
                "users": len(self.history),
                "events_seen": self.events_seen,
                "last_event_at": self.last_event_at,
                "tail_error": self.tail_error,
                "rebuild_s": self.rebuild_s,
                "rebuilt_from": self.rebuilt_from,
            }

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def give_back_memory() -> None:
    """Return the rebuild's freed memory to the system. The rebuild's transient arrays (the index
    as strings, the encodings, the sort) are freed but stay in the allocators' heaps: at 1M users
    the shard's RSS stayed ~5 KB per user above what its rings hold, against ~0.8 KB once given
    back (``bench.scale``)."""
    gc.collect()
    pa.default_memory_pool().release_unused()
    name = ctypes.util.find_library("c")
    if name is None:
        return
    trim = getattr(ctypes.CDLL(name), "malloc_trim", None)  # glibc's; other libcs lack it
    if trim is not None:
        trim(0)


def newest_index(
    registry: Any, keep: Callable[[pa.Array], pa.Array] | None = None
) -> HistoryIndex | None:
    """The newest version's history index (of the users ``keep`` masks) and watermark, or None
    (no version, or one written before versions carried the index)."""
    version = registry.latest()
    if version is None:
        return None
    watermark = registry.meta(version).get("watermark")
    if not watermark:
        return None
    try:
        histories = registry.read_coded_histories(version, keep)
    except HistoriesError as err:  # a version from before the index: the whole buffer then
        log.info("v%d has no history index (%s): rebuilding from the whole buffer", version, err)
        return None
    return HistoryIndex(version, histories, {str(k): int(v) for k, v in watermark.items()})


def _covered(watermark: dict[str, int], upto: dict[str, int]) -> bool:
    """The index is usable when the buffer still holds everything after its watermark: no
    partition of it is behind the index (a buffer reset or a retention cut past it)."""
    for key, offset in watermark.items():
        parse_tp(key)  # a malformed key is an error here, not a silent full-buffer read
        if upto.get(key, 0) < offset:
            return False
    return True
