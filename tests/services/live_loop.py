"""What the live tests share: a short loop's settings (small model, own topics and consumer groups
on the session broker), and ``running_loop``, which starts ingest, Ray and Serve with them for a
test that drives rounds itself, and stops everything after."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import ray

from services.runtime import Running, start
from services.settings import load_settings
from services.stopping import stop_threads
from streams.admin import ensure_topics
from streams.config import KafkaConfig


@contextmanager
def running_loop(env: dict[str, str], **ray_init: Any) -> Iterator[Running]:
    """`up`'s components (ingest, the loop, serving with HTTP) on a local Ray, with ``env`` set
    while they run; ``ray_init``: options for ``ray.init`` beyond the defaults."""
    old = dict(os.environ)
    os.environ.update(env)
    try:
        s = load_settings()
        ensure_topics(s.kafka, s.topics)
        ray.init(**{"num_cpus": 4, "include_dashboard": False, "log_to_driver": False,
                    **ray_init})  # fmt: skip
        running = start(s, serve_http=True)
        try:
            yield running
        finally:
            # Every thread that calls Ray ends before Ray does (a gauge set under ray.shutdown
            # segfaults).
            stop_threads(running)
            from ray import serve

            serve.shutdown()
            ray.shutdown()
    finally:
        os.environ.clear()
        os.environ.update(old)


def small_env(
    kafka: KafkaConfig, state: Path, port: int, topics: str = "metrics"
) -> dict[str, str]:
    """The environment of a short loop on the session broker: own topics (``<topics>-<state
    dir name>``) and consumer groups, one replica, a small model, one-epoch rounds."""
    return {
        "STREAMTUNE_STATE_DIR": str(state),
        # Own consumer groups: the session broker is shared, and a member another test left
        # in a shared group would hold up this one's assignment.
        "STREAMTUNE_INGEST__GROUP_ID": f"ingest-{state.name}",
        "STREAMTUNE_SERVING__HISTORY_GROUP": f"history-{state.name}",
        "STREAMTUNE_EMBEDDED_BROKER": "false",
        "STREAMTUNE_KAFKA__BOOTSTRAP_SERVERS": kafka.bootstrap_servers,
        "STREAMTUNE_TOPICS__EVENTS": f"{topics}-{state.name}.events",
        "STREAMTUNE_TOPICS__DEAD_LETTER": f"{topics}-{state.name}.dlq",
        "STREAMTUNE_SERVING__PORT": str(port),
        "STREAMTUNE_SERVING__REPLICAS": "1",
        "STREAMTUNE_MODEL__MAX_LEN": "20",
        "STREAMTUNE_MODEL__D_MODEL": "32",
        "STREAMTUNE_MODEL__TEXT_INIT": "false",
        "STREAMTUNE_TRAINER__EPOCHS": "1",
        "STREAMTUNE_TRAINER__FIRST_ROUND_EPOCHS": "1",
        "STREAMTUNE_TRAINER__BATCH_SIZE": "64",
        "STREAMTUNE_GATE__MIN_EVAL_USERS": "10",
        "STREAMTUNE_LOOP__MIN_ROUND_EVENTS": "300",
        "STREAMTUNE_INGEST__FLUSH_INTERVAL_S": "0.3",
        "STREAMTUNE_SUPERVISOR__GAUGES_EVERY_S": "1",
        "STREAMTUNE_SUPERVISOR__BACKOFF_S": "0.1",
    }
