"""Starting the pieces of a running system, shared by `streamtune up`, `demo` and tests."""

from __future__ import annotations

import logging
import math
import os
import threading
from dataclasses import dataclass
from typing import Any

from services.loop import ContinualLoop
from services.settings import Settings
from serving.context import start_context
from serving.rollout import RolloutController
from streams.buffer import EventBuffer
from streams.ingest import Ingestor
from training.registry import Registry
from training.round import RoundConfig

log = logging.getLogger(__name__)


def round_config(s: Settings) -> RoundConfig:
    return RoundConfig(model=s.model, trainer=s.trainer, replay=s.replay, gate=s.gate)


def init_ray(address: str | None, s: Settings, dashboard: bool = True) -> None:
    """Connect to ``address``, or start a local Ray instance sized for the whole system.

    Locally, Ray's CPU count is logical: a 2-core laptop must still fit the trainer's workers
    beside the Serve replicas, or a round would wait forever for resources Serve holds.
    """
    import ray

    if ray.is_initialized():
        return
    if address:
        ray.init(address=address)
        return
    needed = s.trainer.num_workers * s.trainer.cpus_per_worker + 0.25 * s.serving.replicas + 1
    ray.init(
        num_cpus=max(os.cpu_count() or 1, math.ceil(needed)),
        include_dashboard=dashboard,
        dashboard_host="127.0.0.1",  # loopback only unless the user runs their own cluster
        log_to_driver=False,
    )


@dataclass
class Running:
    settings: Settings
    buffer: EventBuffer
    registry: Registry
    ingestor: Ingestor
    ingest_thread: threading.Thread
    loop: ContinualLoop
    controller: RolloutController | None
    context: Any

    def stop(self) -> None:
        """Graceful: ingest flushes what it holds before its thread ends."""
        self.ingestor.stop()
        self.ingest_thread.join(timeout=60)


def start(s: Settings, serve_http: bool = True, on_round: Any = None) -> Running:
    """Ingest (thread), serving context + Serve (optional) and the loop, on an initialised Ray."""
    from services.metrics import StreamMetrics

    metrics = StreamMetrics()
    buffer = EventBuffer(s.buffer)
    registry = Registry(s.registry_path, keep=s.gate.keep_versions)

    def on_flush(seg: Any, stats: Any) -> None:
        try:
            metrics.on_flush(seg, stats, member=ingestor.member)
            metrics.gauge("buffer_rows", float(buffer.stats().rows))
        except Exception:  # metrics must never stop ingest
            log.debug("metrics update failed", exc_info=True)

    ingestor = Ingestor(s.kafka, s.topics, s.ingest, buffer, on_flush=on_flush)
    thread = threading.Thread(target=ingestor.run, name="ingest", daemon=True)
    thread.start()
    context = controller = None
    if serve_http:
        from ray import serve

        serve.start(http_options={"host": s.serving.host, "port": s.serving.port})
        context = start_context(s.kafka, s.topics, s.buffer, s.serving)
        controller = RolloutController(registry, s.serving, s.rollout, context)

    def record(result: Any, rec: dict[str, Any]) -> None:
        try:
            metrics.observe("round_s", rec["seconds"])
            metrics.count(
                "decisions", tags={"decision": "promote" if result.promoted else "reject"}
            )
            champ = registry.champion()
            if champ is not None:
                metrics.gauge("champion", float(champ))
            for key in ("cand_new_ndcg10", "cand_replay_ndcg10"):
                if key in result.metrics:
                    metrics.gauge("ndcg", result.metrics[key],
                                  tags={"version": str(result.version), "set": key})  # fmt: skip
        except Exception:
            log.debug("metrics update failed", exc_info=True)
        if on_round is not None:
            on_round(result, rec)

    loop = ContinualLoop(buffer, registry, round_config(s), s.loop, s.state_dir / "loop.json",
                         on_round=record)  # fmt: skip
    return Running(s, buffer, registry, ingestor, thread, loop, controller, context)
