"""Typed configuration of serving: the HTTP app, its replicas, and the rollout controller."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, SecretStr

from streams.config_base import StrictConfig
from training.sequential import SequentialConfig


class ServingConfig(StrictConfig):
    """The Ray Serve application."""

    app_name: str = Field(default="streamtune", description="Serve application name.")
    host: str = Field(default="127.0.0.1", description="HTTP bind address; loopback unless opened.")
    port: int = Field(default=8000, ge=1, le=65535, description="HTTP port.")
    ingress: Literal["haproxy", "proxy"] = Field(
        default="haproxy",
        description="How HTTP reaches the replicas on a Ray that streamtune starts itself: "
        "'haproxy' (Ray Serve's HAProxy ingress: requests go straight to each replica's own "
        "HTTP server, about twice the throughput of the proxy on 2 cores) or 'proxy' (Serve's "
        "default Python proxy actor). On a cluster you run, the nodes' environment decides "
        "(RAY_SERVE_ENABLE_HA_PROXY=1, see the README).",
    )
    # At Ray's 15 the shards' Kafka tail and the replicas' history feed waited behind training
    # workers of the same weight (docs/design.md, "Niceness").
    worker_niceness: int = Field(
        default=0,
        ge=0,
        le=19,
        description="Niceness of the worker processes of a Ray that streamtune starts itself "
        "(Serve replicas, history shards; Ray's own default is 15), so the request path runs at "
        "the priority of ingest and the broker and training workers (trainer.nice) yield to it. "
        "On a cluster you run, the nodes' RAY_worker_niceness decides.",
    )
    replicas: int = Field(default=2, ge=1, description="Replicas (the minimum when autoscaling).")
    max_replicas: int | None = Field(
        default=None, ge=1, description="Autoscale up to this many replicas; None = fixed count."
    )
    target_ongoing_requests: float = Field(
        default=4.0, gt=0, description="Autoscaling target of in-flight requests per replica."
    )
    max_ongoing_requests: int = Field(default=32, ge=1, description="Per-replica concurrency cap.")
    batch_max_size: int = Field(
        default=16,
        ge=1,
        le=1024,
        description="Most concurrent /recommend and /score requests a replica scores in one "
        "model forward (and one history look-up); keep it at most max_ongoing_requests.",
    )
    batch_wait_s: float = Field(
        default=0.0,
        ge=0.0,
        le=1.0,
        description="How long a replica waits after a batch's first request for more to join "
        "it (latency added to every request when idle). 0 = take the requests that arrived "
        "meanwhile: under load they pile up while a forward runs, so batches form anyway.",
    )
    access_log: bool = Field(
        default=False,
        description="Serve's access log: a line per request in each replica's log file (Serve's "
        "own default is on). Off here because at hundreds of requests a second it is ~3% of a "
        "replica's CPU; request counts, errors and latencies are in Serve's metrics either way.",
    )
    max_k: int = Field(default=100, ge=1, description="Largest k a request may ask for.")
    max_history: int = Field(default=1000, ge=1, description="Longest history a request may send.")
    max_body_bytes: int = Field(default=64 * 1024, ge=1024, description="Larger bodies get 413.")
    history_len: int = Field(
        default=100, ge=1, description="Recent items kept per user by the history component."
    )
    history_shards: int = Field(
        default=1,
        ge=1,
        le=1024,
        description="Actors the live histories (and click bookkeeping) are split across, by a "
        "hash of the user id, spread over the replicas' nodes; each reads the whole event "
        "stream and keeps its users. Add shards when one process cannot hold every user "
        "(~0.6 KB each at history_len 100) or a restart's rebuild takes too long: a shard "
        "rebuilds only its users. Changing it starts a new set of shards.",
    )
    history_users: int | None = Field(
        default=None,
        ge=1,
        description="Users whose live history the history component keeps (past it, the least "
        "recently active are dropped); None: every user, as memory allows (~0.6 KB per user at "
        "history_len 100).",
    )
    replica_history_users: int = Field(
        default=20_000,
        ge=1,
        description="Users whose live history each replica keeps next to it (least recently "
        "asked dropped; each up to history_len items), following the history component's change "
        "feed; others are read from the component once, then kept.",
    )
    history_feed_len: int = Field(
        default=100_000,
        ge=1000,
        description="Changes the history component keeps for the replicas' caches to follow; a "
        "replica further behind than this drops its cache and starts again.",
    )
    history_sync_s: float = Field(
        default=0.05,
        gt=0,
        le=1.0,
        description="Least time between two reads of the history feed by a replica (what a new "
        "event may wait, at most, before the replicas' caches have it; fewer calls when busy).",
    )
    history_group: str = Field(
        default="streamtune-history", description="Kafka consumer group of the history component."
    )
    follow_s: float = Field(
        default=1.0,
        gt=0,
        description="How often each replica reads the serving version the rollout controller "
        "recorded in the registry (how an app deployed on its own follows rollouts).",
    )
    node_resource: str | None = Field(
        default=None,
        description="A custom resource only the nodes meant for replicas have (e.g. the worker "
        "nodes'); replicas and history shards then never land on the head. None = anywhere.",
    )
    settle_s: float = Field(
        default=120.0,
        gt=0,
        description="A live trial's interleaved answer counts as won, lost or tied once the user "
        "is served again or this many seconds have passed: the clicks that decide it arrive by "
        "then (longer waits for late clicks; shorter decides sooner).",
    )
    api_key: SecretStr | None = Field(
        default=None, description="If set, requests must send it in the X-API-Key header."
    )

    def on_serving_nodes(self, share: float = 0.001) -> dict[str, float]:
        """Ray resources that place a replica or a history shard on the serving nodes: a
        ``share`` of their marker (``node_resource``); none when no marker is set."""
        return {self.node_resource: share} if self.node_resource else {}


class RolloutConfig(StrictConfig):
    """Automatic roll-forward to each champion, and rollback when a version misbehaves live."""

    poll_s: float = Field(default=1.0, gt=0, description="How often the registry is checked.")
    watch_s: float = Field(default=30.0, ge=0, description="Live watch window after a rollout.")
    min_requests: int = Field(
        default=20, ge=1, description="Requests a version must serve before it can be judged."
    )
    max_error_rate: float = Field(
        default=0.05, ge=0, le=1, description="Roll back above this share of failed requests."
    )
    max_p99_ms: float = Field(
        default=1000.0,
        gt=0,
        description="Roll back above this p99 (ms); loose, as training may share the cores.",
    )
    min_click_ratio: float = Field(
        default=0.5,
        ge=0,
        description="Roll back if the click-through on served items falls below this fraction "
        "of the previous version's (judged only once both have min_clicks_base clicks).",
    )
    min_clicks_base: int = Field(default=20, ge=1, description="Clicks needed to judge CTR.")
    converge_timeout_s: float = Field(
        default=120.0,
        gt=0,
        description="With a Serve app deployed on its own: how long a rollout waits for every "
        "replica to report the new version before it goes on (and warns).",
    )
    in_cluster: bool = Field(
        default=False,
        description="Run the rollout controller as a named, detached Ray actor on the head node "
        "(restarted by Ray, outliving `up`; a restarted `up` finds it) instead of a thread of "
        "`up`. `up --address` turns it on unless it is set.",
    )
    live: Literal["off", "guard", "canary"] = Field(
        default="off",
        description="Live evaluation by interleaving: 'off'; 'guard' (the serving lineage is "
        "interleaved with the last live-verified version, and rolled back to it, with "
        "promotions paused, if that baseline wins); 'canary' (a new champion serves only "
        "interleaved answers until it wins, and is discarded if it loses).",
    )
    live_share: float = Field(
        default=0.2,
        gt=0,
        le=1,
        description="Share of /recommend answers interleaved while a live trial runs (the "
        "rest are the serving version's alone).",
    )
    live_test: SequentialConfig = Field(
        default_factory=SequentialConfig,
        description="The live trial's sequential test (false-decision bound alpha, prior).",
    )
    baseline_age_s: float = Field(
        default=300.0,
        ge=0,
        description="guard: a verified serving version becomes the new baseline only once the "
        "current baseline is at least this old, so the baseline stays minutes behind the "
        "serving lineage, whatever the round rate.",
    )
    live_max_impressions: int = Field(
        default=20000,
        ge=1,
        description="guard: a trial that reaches this many impressions undecided counts the "
        "serving lineage as verified (no worse than the baseline at this power).",
    )
    pause_s: float = Field(
        default=1800.0,
        ge=0,
        description="guard: after a rollback to the baseline, new champions wait this long "
        "before they are rolled out (`streamtune rollout promote` still works).",
    )
