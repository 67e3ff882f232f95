"""Live histories next to the replicas: the history component's change feed, and a bounded
per-replica cache that follows it.

Why: looking every batch's users up in the history component was a Ray actor call per batch,
which cost more CPU than the model forward it fed (``bench.serving``). Now a replica answers from
its own cache, and the component is called only for users the replica does not hold yet.

The protocol, all of it here (pure Python, so it is unit-tested without Ray):

* The component numbers every event it applies, ``seq`` 1, 2, ... within one incarnation
  (``epoch``: a restarted component starts again), and keeps the last changes (``ChangeLog``).
* A replica long-polls ``ChangeLog.since(epoch, seq)`` and applies what comes to the users it
  holds. A cursor from another epoch, or older than the log reaches, gets a reset: the replica
  drops its users and starts again from the component's position.
* A miss is read from the component with the ``seq`` it was read at. Changes up to that ``seq``
  are in it; changes the replica's feed applied past it while the read was in flight were kept
  for that user (``begin_fill``) and are added; changes the feed delivers later that the read
  already had are skipped by their ``seq``. So a cached history is exactly the component's, one
  feed poll behind.

Memory is bounded per replica (``max_users`` least recently asked, each ``history_len`` items),
not a copy of every user: the component stays the one place that holds everyone.
"""

from __future__ import annotations

import uuid
from collections import OrderedDict, deque
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Changes:
    """What a replica's feed poll gets: the component's ``epoch`` and ``seq`` (its newest
    change), and the changes after the cursor as (seq, user, item); ``None``: the cursor is not
    from this epoch or older than the log reaches, so the replica must start again."""

    epoch: str
    seq: int
    items: list[tuple[int, str, str]] | None


@dataclass(frozen=True)
class Read:
    """Histories read from the component as of its change ``seq``."""

    epoch: str
    seq: int
    histories: list[list[str]]


class ChangeLog:
    """The component's side: the last ``maxlen`` changes, numbered. Not thread-safe: the
    component calls it under its own lock."""

    def __init__(self, maxlen: int) -> None:
        self.epoch = uuid.uuid4().hex
        self.seq = 0
        self._log: deque[tuple[int, str, str]] = deque(maxlen=maxlen)

    def append(self, user: str, item: str) -> None:
        self.seq += 1
        self._log.append((self.seq, user, item))

    def since(self, epoch: str | None, seq: int) -> Changes:
        oldest = self._log[0][0] if self._log else self.seq + 1
        if epoch != self.epoch or seq > self.seq or seq < oldest - 1:
            return Changes(self.epoch, self.seq, None)
        out = []
        for entry in reversed(self._log):  # the newest first: a follower wants the last few
            if entry[0] <= seq:
                break
            out.append(entry)
        out.reverse()
        return Changes(self.epoch, self.seq, out)


@dataclass
class _Entry:
    items: deque[str]
    applied: int  # the newest change seq this history includes


@dataclass
class _Fill:
    """Changes the feed delivered for one user while a read of it was in flight."""

    readers: int = 0
    seen: list[tuple[int, str]] = field(default_factory=list)


class ReplicaHistories:
    """The replica's side: up to ``max_users`` users' histories, kept current by the feed.

    Single-threaded by design: the replica's event loop calls every method (no awaits inside).
    """

    def __init__(self, max_users: int, history_len: int) -> None:
        self.max_users, self.history_len = max_users, history_len
        self.epoch: str | None = None  # None: not following a feed, so nothing is cached
        self.seq = 0
        self.generation = 0  # bumped on every reset: reads begun before it are not cached
        self._users: OrderedDict[str, _Entry] = OrderedDict()
        self._fills: dict[str, _Fill] = {}
        self.hits = 0
        self.misses = 0

    @property
    def following(self) -> bool:
        return self.epoch is not None

    def __len__(self) -> int:
        return len(self._users)

    def lookup(self, users: list[str]) -> list[list[str] | None]:
        """Each user's cached history, or None for one not held (read it from the component)."""
        out: list[list[str] | None] = []
        for u in users:
            e = self._users.get(u)
            if e is None:
                self.misses += 1
                out.append(None)
            else:
                self.hits += 1
                self._users.move_to_end(u)
                out.append(list(e.items))
        return out

    def begin_fill(self, users: list[str]) -> int:
        """Before reading ``users`` from the component: keep what the feed brings them meanwhile.
        Returns the token ``end_fill`` takes."""
        for u in users:
            self._fills.setdefault(u, _Fill()).readers += 1
        return self.generation

    def end_fill(self, token: int, users: list[str], read: Read | None) -> list[list[str]]:
        """The read's histories with the changes the feed delivered past it; cached when the
        read and the feed are of one epoch and no reset came between. ``read`` None: it failed
        (nothing cached, empty histories)."""
        out: list[list[str]] = []
        for i, u in enumerate(users):
            fill = self._fills[u]
            fill.readers -= 1
            if fill.readers == 0:
                del self._fills[u]
            if read is None:
                out.append([])
                continue
            items = deque(read.histories[i], maxlen=self.history_len)
            applied = read.seq
            for s, item in fill.seen:
                if s > applied:
                    items.append(item)
                    applied = s
            out.append(list(items))
            if token == self.generation and read.epoch == self.epoch:
                self._put(u, _Entry(items, applied))
        return out

    def apply(self, changes: Changes) -> None:
        """One feed poll's answer."""
        if changes.items is None or changes.epoch != self.epoch:
            self.reset(changes.epoch, changes.seq)
            return
        for s, user, item in changes.items:
            e = self._users.get(user)
            if e is not None and s > e.applied:
                e.items.append(item)
                e.applied = s
            fill = self._fills.get(user)
            if fill is not None:
                fill.seen.append((s, item))
        self.seq = changes.seq

    def reset(self, epoch: str | None, seq: int = 0) -> None:
        """Drop every user; follow ``epoch`` from ``seq`` (None: stop following)."""
        self._users.clear()
        self.generation += 1
        self.epoch, self.seq = epoch, seq

    def _put(self, user: str, entry: _Entry) -> None:
        self._users[user] = entry
        self._users.move_to_end(user)
        while len(self._users) > self.max_users:
            self._users.popitem(last=False)
