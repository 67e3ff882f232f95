"""A replica's live histories: per history shard, a ``ReplicaHistories`` cache fed by that
shard's change feed from a task of the replica's event loop (see ``serving.history_feed``).

Until a shard's feed is followed (the shard starting, restarting, or one from an older release
that has no feed) every look-up of its users goes to it, as one call per batch: answers are never
older than the shard's because of the cache.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from ray.exceptions import RayActorError

from serving.clicks import Served
from serving.config import ServingConfig
from serving.history_feed import ReplicaHistories
from serving.shards import find_shard, split_by_shard
from serving.streak import Streak

log = logging.getLogger(__name__)


class HistoryFollower:
    """``context()`` gives the component's handle (None when there is none); ``lost()`` is
    called when a call to it failed, so the caller looks it up again."""

    def __init__(
        self, cfg: ServingConfig, context: Callable[[], Any], lost: Callable[[], None]
    ) -> None:
        per_shard = max(1, cfg.replica_history_users // cfg.history_shards)
        self.cache = ReplicaHistories(per_shard, cfg.history_len)
        self._wait_s, self._sync_s = cfg.follow_s, cfg.history_sync_s
        self._context, self._lost = context, lost

    def counters(self) -> dict[str, int]:
        """For the replica's report: how often a look-up was answered here, and how full."""
        c = self.cache
        return {"hits": c.hits, "misses": c.misses, "users": len(c), "following": c.following}

    async def follow_forever(self) -> None:
        while True:
            ctx = self._context()
            if ctx is None:
                self.cache.reset(None)
                await asyncio.sleep(self._wait_s)
                continue
            started = time.monotonic()
            try:
                changes = await ctx.changes_since.remote(
                    self.cache.epoch, self.cache.seq, self._wait_s
                )
            except Exception as err:  # restarting, gone, or an older release without the feed
                if self.cache.following:
                    log.warning("history feed lost (%s); look-ups go to the component", err)
                self.cache.reset(None)
                self._lost()
                await asyncio.sleep(self._wait_s)
                continue
            self.cache.apply(changes)
            # Coalesce: a busy stream is read in batches, not one call per event.
            await asyncio.sleep(max(0.0, self._sync_s - (time.monotonic() - started)))

    async def histories(self, ctx: Any, users: list[str]) -> list[list[str]]:
        """``users``' live histories, in order: held ones from the cache, the others read from
        the component ``ctx`` in one call (and held from then on)."""
        if not self.cache.following:
            return await fetch_histories(ctx, users)
        got = self.cache.lookup(users)
        misses = [u for u, h in zip(users, got, strict=True) if h is None]
        if not misses:
            return got  # type: ignore[return-value]
        token = self.cache.begin_fill(misses)
        read = None
        try:
            read = await ctx.histories_at.remote(misses)
        finally:
            filled = iter(self.cache.end_fill(token, misses, read))
        return [h if h is not None else next(filled) for h in got]


async def fetch_histories(ctx: Any, users: list[str]) -> list[list[str]]:
    """Every user's live history in one call to the component. One started by an older release
    (detached, it can outlive an upgrade) lacks the batch method: one call per user."""
    try:
        method = ctx.get_histories
    except AttributeError:
        return list(await asyncio.gather(*(ctx.get_history.remote(u) for u in users)))
    out: list[list[str]] = await method.remote(users)
    return out


class ShardedHistories:
    """The replica's view of every shard: who holds a user, a follower per shard, and the
    shards' handles (looked up by name, again after a call to one failed)."""

    def __init__(self, cfg: ServingConfig, namespace: str, log_to: logging.Logger) -> None:
        self.n, self.namespace = cfg.history_shards, namespace
        self._handles: dict[int, Any] = {}
        self.followers = [
            HistoryFollower(cfg, self._getter(i), self._loser(i)) for i in range(self.n)
        ]
        self._lookups = Streak(log_to, "looking up live histories")

    def handle(self, i: int) -> Any:
        h = self._handles.get(i)
        if h is None:
            h = find_shard(i, self.n, self.namespace)
            if h is not None:
                self._handles[i] = h
        return h

    def lost(self, i: int) -> None:
        self._handles.pop(i, None)

    def _getter(self, i: int) -> Any:
        return lambda: self.handle(i)

    def _loser(self, i: int) -> Any:
        return lambda: self.lost(i)

    def counters(self) -> dict[str, int]:
        """Summed over the shards' caches, for the replica's report."""
        out = {"hits": 0, "misses": 0, "users": 0, "following": 0}
        for f in self.followers:
            for k, v in f.counters().items():
                out[k] += int(v)
        return out

    async def follow_forever(self) -> None:
        await asyncio.gather(*(f.follow_forever() for f in self.followers))

    async def histories(self, users: list[str]) -> list[list[str]]:
        """The live histories of ``users``, in order, each from its shard (the replica's cache of
        it first). A shard that is down answers nothing: its users get popularity (the
        response's ``source`` says so) rather than failed requests."""
        out: list[list[str]] = [[] for _ in users]
        groups = split_by_shard(users, self.n)
        await asyncio.gather(*(self._from_shard(i, pos, users, out) for i, pos in groups.items()))
        return out

    async def _from_shard(
        self, i: int, pos: list[int], users: list[str], out: list[list[str]]
    ) -> None:
        mine = [users[p] for p in pos]
        for _ in range(2):
            h = self.handle(i)
            if h is None:
                return
            try:
                got = await self.followers[i].histories(h, mine)
            except RayActorError as err:
                # The shard died (Ray restarts it under the same name): drop the cached handle
                # and ask once more; if it is still down, its users get popularity.
                self._lookups.failed(err, "answering from popularity until it is back")
                self.lost(i)
                continue
            self._lookups.ok()
            for p, h_ in zip(pos, got, strict=True):
                out[p] = h_
            return

    async def report_served(self, served: dict[str, Served]) -> None:
        """What this replica served, to the shards that hold those users. Raises the first
        failure (after every shard was tried): the caller logs it; those items' clicks are lost."""
        users = list(served)
        calls = []
        for i, pos in split_by_shard(users, self.n).items():
            h = self.handle(i)
            if h is not None:
                calls.append(h.record_served.remote({users[p]: served[users[p]] for p in pos}))
        for result in await asyncio.gather(*calls, return_exceptions=True):
            if isinstance(result, BaseException):
                self._handles.clear()  # looked up again: a restarted shard has a new handle
                raise result
