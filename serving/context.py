"""ServingContext: the serving control plane, as one named Ray actor on the head node; and the
history shards it starts beside it.

* Live state per user (histories, their change feed, click-through bookkeeping) is in the history
  shards (``serving.history_shard``), split by user hash (``serving.shards``): the replicas call
  the shards directly, and this actor only sums what the shards report.
* Per-version serving stats reported by replicas (requests, errors, latencies) and which version
  each replica serves; with the shards' click-through (``window``), the rollout controller judges
  versions from these (``serving.version_stats``).
* Rollout announcements: a counter the replicas wait on, so a new version reaches them at once.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import ray

from serving.config import ServingConfig
from serving.errors import ServingError
from serving.heap import freeze_startup
from serving.history_shard import FEED_THREADS, HistoryShard
from serving.shards import find_shard, shard_name, shard_of
from serving.version_stats import (
    BUCKET_KEEP_S,
    SNAPSHOT_RECENT,
    VersionStats,
    chosen_versions,
    forget_versions,
    versions_of,
)
from streams.config import BufferConfig, KafkaConfig, TopicsConfig

log = logging.getLogger(__name__)

__all__ = [
    "BUCKET_KEEP_S",
    "CONTEXT_ACTOR",
    "CONTROL_NAMESPACE",
    "SNAPSHOT_RECENT",
    "ServingContext",
    "VersionStats",
    "chosen_versions",
    "find_context",
    "forget_versions",
    "start_context",
]

CONTEXT_ACTOR = "streamtune-serving-context"
# Every control-plane actor lives here, so a Serve app deployed by another job finds them.
CONTROL_NAMESPACE = "streamtune"
# Replicas waiting for a rollout announcement hold a thread each, for up to serving.follow_s:
# they get threads of their own, so however many replicas wait, reports never queue behind them.
# Past this many replicas, a wait queues for at most follow_s before it starts.
HINT_THREADS = 128
# How long a snapshot waits for a shard's figures: a shard rebuilding after a restart must not
# stall the rollout controller or the supervisor's liveness ping.
SHARD_WAIT_S = 2.0


class ServingContext:
    """Run as a named, detached-capable Ray actor (see ``start_context``)."""

    def __init__(self, shards: int) -> None:
        self.shards = shards
        self.lock = threading.Lock()
        self.stats: dict[str, VersionStats] = {}
        self.replicas: dict[str, dict[str, Any]] = {}
        self.load_failures: dict[str, str] = {}
        self._forgot_at = time.time()
        self._handles: dict[int, Any] = {}
        # Rollout announcements: a counter the replicas' followers wait on (see ``announce``).
        self._announced = threading.Condition()
        self.announcements = 0
        freeze_startup()  # serving.heap

    # -- the shards -----------------------------------------------------------------------
    def _shard(self, i: int) -> Any:
        h = self._handles.get(i)
        if h is None:
            h = find_shard(i, self.shards, CONTROL_NAMESPACE)
            if h is not None:
                self._handles[i] = h
        return h

    def _ask_shards(self, method: str, *args: Any) -> list[Any]:
        """Every shard's answer to ``method(*args)``; None for a shard that is not answering
        within ``SHARD_WAIT_S`` (restarting, rebuilding), which a snapshot then reports."""
        refs = {}
        for i in range(self.shards):
            h = self._shard(i)
            if h is not None:
                refs[i] = getattr(h, method).remote(*args)
        out: list[Any] = [None] * self.shards
        for i, ref in refs.items():
            try:
                out[i] = ray.get(ref, timeout=SHARD_WAIT_S)
            except Exception as err:  # the shard restarting: reported as missing, looked up again
                log.debug("history shard %d did not answer %s: %s", i, method, err)
                self._handles.pop(i, None)
        return out

    def get_history(self, user: str) -> list[str]:
        """One user's live history, from its shard (for tools and checks; replicas call the
        shards themselves). Raises when the shard is not there."""
        i = shard_of(user, self.shards)
        h = self._shard(i)
        if h is None:
            raise ServingError(f"history shard {i} of {self.shards} is not running")
        out: list[str] = ray.get(h.get_history.remote(user), timeout=30)
        return out

    # -- serving stats ------------------------------------------------------------------
    def _stats(self, version: str) -> VersionStats:
        s = self.stats.get(version)
        if s is None:
            s = self.stats[version] = VersionStats()
        return s

    def report(
        self, replica: str, version: str | None, requests: dict[str, list[tuple[float, bool]]],
        counters: dict[str, int] | None = None,
    ) -> None:  # fmt: skip
        """A replica's batch since its last report: per version (latency_ms, ok) samples, and its
        counters (history cache, batches). What it served goes to the shards (``record_served``)."""
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
            if now - self._forgot_at > 60:
                self._forgot_at = now
                forget_versions(self.stats, versions_of(self._live_replicas(now)), now)

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
        them, summed over the shards."""
        served = clicked = 0
        for w in self._ask_shards("window", version, since, until):
            if w is not None:
                served, clicked = served + int(w["served"]), clicked + int(w["clicked"])
        return {"served": served, "clicked": clicked,
                "ctr": clicked / served if served else 0.0}  # fmt: skip

    def trial_counts(self, trial: str) -> dict[str, list[int]]:
        """Per answering shard, its running tally of ``trial``'s settled impressions (a wins, b
        wins, ties, clicks credited to a, to b: ``serving.clicks.TALLY``). Per shard, not
        summed: a restarted shard starts again from zero, and the controller must tell that
        from no new impressions."""
        out = self._ask_shards("trial_counts", trial)
        return {str(i): list(c) for i, c in enumerate(out) if c is not None}

    def _live_replicas(self, now: float) -> dict[str, dict[str, Any]]:
        """Replicas that reported in the last 30 s."""
        return {r: d for r, d in self.replicas.items() if now - d["at"] < 30}

    def snapshot(self, versions: list[str] | None = None) -> dict[str, Any]:
        """Replicas, load failures, the shards' figures and the stats of ``versions`` (None: the
        live ones and the most recently active others; ``[]``: none, the cheapest call)."""
        with self.lock:
            now = time.time()
            live = self._live_replicas(now)
            chosen = chosen_versions(self.stats, versions_of(live), versions)
        shards = self._ask_shards("status", chosen)
        totals: dict[str, list[int]] = {}
        for part in shards:
            for v, (served, clicked) in (part["clicks"] if part else {}).items():
                t = totals.setdefault(v, [0, 0])
                t[0], t[1] = t[0] + served, t[1] + clicked
        up = [s for s in shards if s is not None]
        last = [s["last_event_at"] for s in up if s["last_event_at"] is not None]
        errors = [s["tail_error"] for s in up if s["tail_error"]]
        with self.lock:
            return {
                "replicas": live,
                "versions": {
                    v: self.stats[v].summary(tuple(totals.get(v, (0, 0))))  # type: ignore[arg-type]
                    for v in chosen
                },
                "load_failures": dict(self.load_failures),
                "history_users": sum(s["users"] for s in up),
                "events_seen": sum(s["events_seen"] for s in up),
                "last_event_at": max(last) if last else None,
                "tail_error": errors[0] if errors else None,
                "shards": [
                    {k: x for k, x in s.items() if k != "clicks"}
                    if s is not None
                    else {"shard": i, "answering": False}
                    for i, s in enumerate(shards)
                ],
            }


def start_context(
    kafka: KafkaConfig, topics: TopicsConfig, buffer: BufferConfig | None, cfg: ServingConfig,
    registry: Any = None,
) -> Any:  # fmt: skip
    """Start (or find) the history shards and the named, detached context actor; returns the
    context's handle.

    The context runs on the head node (the control plane's place); the shards spread over the
    replicas' nodes (``serving.node_resource``, else any), each rebuilding its users from the
    newest version's history index in ``registry`` (when given) plus the buffer's tail. Ray
    restarts any of them whose process dies; a restarted shard rebuilds only its users.
    """
    start_shards(kafka, topics, buffer, cfg, registry)
    actor_cls = ray.remote(  # type: ignore[call-overload]
        num_cpus=0, max_concurrency=64, concurrency_groups={"rollout_hints": HINT_THREADS}
    )(ServingContext)
    return actor_cls.options(
        name=CONTEXT_ACTOR,
        namespace=CONTROL_NAMESPACE,
        get_if_exists=True,
        lifetime="detached",
        max_restarts=-1,
        resources=on_head(),
    ).remote(cfg.history_shards)


def start_shards(
    kafka: KafkaConfig, topics: TopicsConfig, buffer: BufferConfig | None, cfg: ServingConfig,
    registry: Any = None,
) -> list[Any]:  # fmt: skip
    """Start (or find) the ``serving.history_shards`` shard actors; returns their handles."""
    n = cfg.history_shards
    actor_cls = ray.remote(  # type: ignore[call-overload]
        num_cpus=0, max_concurrency=64, concurrency_groups={"history_feed": FEED_THREADS}
    )(HistoryShard)
    resources = cfg.on_serving_nodes()
    args = (kafka.model_dump(), topics.model_dump(),
            buffer.model_dump() if buffer else None, cfg.model_dump(), registry)  # fmt: skip
    return [
        actor_cls.options(
            name=shard_name(i, n),
            namespace=CONTROL_NAMESPACE,
            get_if_exists=True,
            lifetime="detached",
            max_restarts=-1,
            resources=resources,
            scheduling_strategy="SPREAD",
        ).remote(i, n, *args)
        for i in range(n)
    ]


def stop_shards(shards: int) -> None:
    """Kill the shard actors of a layout of ``shards`` (detached: they outlive their starter)."""
    for i in range(shards):
        h = find_shard(i, shards, CONTROL_NAMESPACE)
        if h is not None:
            ray.kill(h, no_restart=True)


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
