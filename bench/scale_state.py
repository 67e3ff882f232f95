"""``bench.scale``'s state part: history shards over a synthetic population."""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.compute as pc

from harness.sigterm import exit_on_sigterm
from streams.buffer import EventBuffer
from streams.config import BufferConfig
from streams.events import ARROW_SCHEMA
from streams.offsets import OffsetRange, tp_key

BUFFERED_TOPIC = "scale.buffered"  # the buffer's; the shards' live tail follows another, empty
CHUNK = 5_000_000
MAX_LEN = 50  # the model's context: what the history index keeps per user


def population(users: int, per_user: int, items: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """User and item codes of ``users * per_user`` events in arrival order (users interleaved at
    random, items Zipf-popular)."""
    rng = np.random.default_rng(seed)
    u = np.repeat(np.arange(users, dtype=np.int32), per_user)
    rng.shuffle(u)
    i = (rng.zipf(1.2, size=len(u)) % items).astype(np.int32)
    return u, i


def write_buffer(
    buf: EventBuffer, u: np.ndarray, i: np.ndarray, topic: str = BUFFERED_TOPIC
) -> None:
    """The events as segments of ``CHUNK`` rows, offsets 0.. on one partition of ``topic``."""
    for start in range(0, len(u), CHUNK):
        end = min(len(u), start + CHUNK)
        n = end - start
        offs = np.arange(start, end, dtype=np.int64)
        table = pa.table(
            {
                "event_id": pc.cast(pa.array(offs), pa.string()),
                "user_id": pc.cast(pa.array(u[start:end]), pa.string()),
                "item_id": pc.cast(pa.array(i[start:end]), pa.string()),
                "event_type": pa.array(np.full(n, "view", dtype=object), pa.string()),
                "value": pa.array(np.ones(n)),
                "ts": pa.array(1_700_000_000_000 + offs),
                "item_text": pa.nulls(n, pa.string()),
                "context": pa.nulls(n, pa.string()),
                "topic": pa.array(np.full(n, topic, dtype=object), pa.string()),
                "partition": pa.array(np.zeros(n, dtype=np.int32)),
                "offset": pa.array(offs),
            },
            schema=ARROW_SCHEMA,
        )
        buf.append(table, [OffsetRange(topic, 0, start, end)], writer="bench")


def index_table(u: np.ndarray, i: np.ndarray) -> pa.Table:
    """The per-user history index those events give (``training.histories``' columns): each
    user's last ``MAX_LEN`` item rows and every row seen (item code c is vocab row c + 1)."""
    order = np.argsort(u, kind="stable")
    grouped = u[order]
    starts = np.flatnonzero(np.r_[True, grouped[1:] != grouped[:-1]])
    sizes = np.diff(np.r_[starts, len(grouped)])
    position = np.arange(len(grouped)) - np.repeat(starts, sizes)
    keep = position >= np.repeat(sizes, sizes) - MAX_LEN
    recent_vals = (i[order][keep] + 1).astype(np.int32)
    recent_off = np.r_[0, np.cumsum(np.minimum(sizes, MAX_LEN))].astype(np.int32)
    items = int(i.max()) + 1
    uniq = np.unique(u.astype(np.int64) * items + i)
    seen_vals = (uniq % items + 1).astype(np.int32)
    seen_len = np.bincount((uniq // items).astype(np.int64), minlength=int(u.max()) + 1)
    seen_off = np.r_[0, np.cumsum(seen_len[grouped[starts]])].astype(np.int32)
    return pa.table({
        "user_id": pc.cast(pa.array(grouped[starts]), pa.string()),
        "recent": pa.ListArray.from_arrays(pa.array(recent_off), pa.array(recent_vals)),
        "seen": pa.ListArray.from_arrays(pa.array(seen_off), pa.array(seen_vals)),
    })  # fmt: skip


def register_index(registry: Any, index: pa.Table, items: int, watermark: dict[str, int],
                   for_rounds: bool = False) -> None:  # fmt: skip
    """A champion over ``items`` items carrying ``index`` as of ``watermark``; ``for_rounds``:
    also the titles and (empty) replay reservoirs a round continues from."""
    from training.config import GateConfig, ModelConfig, ReplayConfig
    from training.histories import save_chain
    from training.model import Recommender
    from training.registry import VersionContent, write_content
    from training.replay import Reservoir
    from training.vocab import ItemVocab

    cfg = ModelConfig()
    vocab = ItemVocab([str(c) for c in range(items)])
    model = Recommender(cfg, len(vocab))

    def write(d: Path) -> None:
        write_content(d, model, VersionContent(vocab, list(range(len(vocab)))))
        save_chain(index, d, None)
        if for_rounds:
            Reservoir(ReplayConfig().capacity, cfg.max_len).save(d)
            Reservoir(GateConfig().replay_eval_size, cfg.max_len).save(d, name="replay_eval")

    meta = {"model_config": cfg.model_dump(), "watermark": watermark}
    registry.register(write, meta, promote=True, reason="bench: rounds over the population")


def rss_of(match: str | None, root: psutil.Process | None = None) -> int:
    """Summed RSS of ``root`` (default: this process) and its descendants, or only of the
    descendants whose command line contains ``match``."""
    root = root or psutil.Process()
    total = 0
    for p in [root, *root.children(recursive=True)]:
        try:
            if match is None or (p is not root and match in " ".join(p.cmdline())):
                total += p.memory_info().rss
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return int(total)


def state_row(users: int, per_user: int, items: int, tail: int, shards: int, seconds: float,
              seed: int) -> dict[str, Any]:  # fmt: skip
    """Write the population, start the shards and Serve, measure (see ``bench.scale``)."""
    from training.registry import Registry

    tmp = Path(tempfile.mkdtemp(prefix=f"bench-scale-state-{users}-"))
    try:
        t0 = time.monotonic()
        u, i = population(users, per_user, items, seed)
        bcfg = BufferConfig(path=tmp / "buffer")
        write_buffer(EventBuffer(bcfg), u, i)
        registry = Registry(tmp / "registry")
        cut = len(u) - tail
        register_index(registry, index_table(u[:cut], i[:cut]), items,
                       {tp_key(BUFFERED_TOPIC, 0): cut})  # fmt: skip
        del u, i
        pa.default_memory_pool().release_unused()
        setup_s = time.monotonic() - t0
        row = _serve_and_measure(tmp, bcfg, registry, users, shards, seconds, seed)
        return {"users": users, "events": users * per_user, "shards": shards,
                "setup_s": setup_s, **row}  # fmt: skip
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _serve_and_measure(tmp: Path, bcfg: BufferConfig, registry: Any, users: int, shards: int,
                       seconds: float, seed: int) -> dict[str, Any]:  # fmt: skip
    import ray
    from ray import serve

    from bench.serving_load import Loader
    from services.runtime import local_ray_environ
    from serving.config import RolloutConfig, ServingConfig
    from serving.context import start_context
    from serving.rollout import RolloutController
    from streams.admin import ensure_topics
    from streams.broker import LocalBroker, free_port
    from streams.config import BrokerConfig, KafkaConfig, TopicsConfig

    broker = LocalBroker(BrokerConfig(state_dir=tmp / "kafka", port=free_port(),
                                      controller_port=free_port()))  # fmt: skip
    broker.up()
    try:
        kafka = KafkaConfig(bootstrap_servers=broker.cfg.bootstrap)
        topics = TopicsConfig(events="scale.events", dead_letter="scale.dlq", partitions=1)
        ensure_topics(kafka, topics)
        cfg = ServingConfig(port=free_port(), history_shards=shards)
        local_ray_environ(cfg)
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
        exit_on_sigterm()  # Ray's handler would end us with no clean-up
        try:
            serve.start(http_options={"host": "127.0.0.1", "port": cfg.port})
            t0 = time.monotonic()
            ctx = start_context(kafka, topics, bcfg, cfg, registry)
            snap = _await_shards(ctx, users, shards)
            rebuild_wall = time.monotonic() - t0
            shard_rss = rss_of("HistoryShard")
            ctl = RolloutController(registry, cfg, RolloutConfig(watch_s=0), ctx)
            ctl.step()
            ctl.close(timeout_s=300.0)
            rng = np.random.default_rng(seed + 1)
            bodies = [{"user_id": str(x), "k": 10} for x in rng.integers(0, users, 5000)]
            loader = Loader()
            try:
                url = f"http://127.0.0.1:{cfg.port}/recommend"
                loader.measure(url, cfg.app_name, bodies, 4, 3.0)  # warm
                lat = {c: loader.measure(url, cfg.app_name, bodies, c, seconds) for c in (1, 8)}
            finally:
                loader.close()
            return {
                "rebuild_s": [s["rebuild_s"] for s in snap["shards"]],
                "rebuilt_from": snap["shards"][0]["rebuilt_from"],
                "rebuild_wall_s": rebuild_wall,
                "shard_rss": shard_rss,
                "total_rss": rss_of(None),
                "c1_p50_ms": float(np.percentile(lat[1]["lat"], 50)),
                "c1_p99_ms": float(np.percentile(lat[1]["lat"], 99)),
                "c8_p50_ms": float(np.percentile(lat[8]["lat"], 50)),
                "c8_p99_ms": float(np.percentile(lat[8]["lat"], 99)),
                "errors": lat[1]["errors"] + lat[8]["errors"],
            }
        finally:
            serve.shutdown()  # its proxies stop their HAProxy
            ray.shutdown()
    finally:
        broker.down()


def _await_shards(ctx: Any, users: int, shards: int, timeout: float = 900.0) -> dict[str, Any]:
    import ray

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        snap: dict[str, Any] = ray.get(ctx.snapshot.remote([]))
        up = [s for s in snap["shards"] if s.get("answering", True)]
        if len(up) == shards and snap["history_users"] >= users:
            return snap
        time.sleep(0.5)
    raise TimeoutError(f"the {shards} history shards did not rebuild {users:,} users in time")
