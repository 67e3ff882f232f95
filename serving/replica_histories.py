"""A replica's live histories: its ``ReplicaHistories`` cache, fed by the history component's
change feed from a task of the replica's event loop (see ``serving.history_feed``).

Until the feed is followed (the component starting, restarting, or one from an older release
that has no feed) every look-up goes to the component, as one call per batch: answers are never
older than the component's because of the cache.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from serving.config import ServingConfig
from serving.history_feed import ReplicaHistories

log = logging.getLogger(__name__)


class HistoryFollower:
    """``context()`` gives the component's handle (None when there is none); ``lost()`` is
    called when a call to it failed, so the caller looks it up again."""

    def __init__(
        self, cfg: ServingConfig, context: Callable[[], Any], lost: Callable[[], None]
    ) -> None:
        self.cache = ReplicaHistories(cfg.replica_history_users, cfg.history_len)
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
