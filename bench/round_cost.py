"""Does a round's cost follow its new events, or everything ever buffered?

    python -m bench.round_cost [--quick] [--storage local|s3] [--sizes 100000,1000000,5000000]

For each size N: a fresh buffer holding N synthetic events (segments of 250k rows, as compaction
leaves them), a registry whose champion's watermark is N events with the per-user history index
those events give (built here once, outside the timing: it is the state that rounds over the N
events leave behind; the champion's weights are a fresh model, which changes nothing of the
cost), then the same 20,000 new events (same users, same items) and one real round through the
loop: plan -> Ray task reading its segments -> Ray Train + DeepSpeed -> gate -> registry.

Reported per N: the round's seconds, its data seconds (segment read in the task), and the growth
ratios largest / smallest. ``--storage s3`` puts the buffer on the project's SeaweedFS server.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from harness.rounds import small_round
from harness.sigterm import exit_on_sigterm
from services.config import LoopConfig
from services.loop import ContinualLoop
from streams.buffer import EventBuffer
from streams.config import BufferConfig
from streams.events import ARROW_SCHEMA
from streams.offsets import OffsetRange
from streams.storage import StorageConfig
from training.config import TrainerConfig
from training.data import user_sequences
from training.histories import UserHistories
from training.model import Recommender
from training.registry import Registry, VersionContent, write_content
from training.replay import Reservoir
from training.round import RoundConfig
from training.vocab import ItemVocab

USERS = 2_000
ITEMS = 3_000
PARTITIONS = 4


def synthetic(start: int, n: int, seed: int = 0, items: int = ITEMS) -> pa.Table:
    """Events [start, start + n): users walk item chains (so the model has something to learn)
    over a catalog of ``items``."""
    rng = np.random.default_rng(seed + start)
    idx = np.arange(start, start + n, dtype=np.int64)
    users = rng.integers(0, USERS, n)
    chain = (users * 37 + idx // USERS + rng.integers(0, 3, n)) % items
    part = (users % PARTITIONS).astype(np.int32)
    return pa.table(
        {
            "event_id": pa.array([f"e{i}" for i in idx], pa.string()),
            "user_id": pa.array([f"u{u}" for u in users], pa.string()),
            "item_id": pa.array([f"i{i}" for i in chain], pa.string()),
            "event_type": pa.array(["click"] * n, pa.string()),
            "value": pa.array(np.ones(n)),
            "ts": pa.array(1_700_000_000_000 + idx * 10),
            "item_text": pa.nulls(n, pa.string()),
            "context": pa.nulls(n, pa.string()),
            "topic": pa.array(["events"] * n, pa.string()),
            "partition": pa.array(part),
            "offset": pa.array(idx),  # one offset sequence per partition is not needed here
        },
        schema=ARROW_SCHEMA,
    )


def append(buffer: EventBuffer, start: int, n: int, chunk: int, items: int = ITEMS,
           seed: int = 0) -> None:  # fmt: skip
    """Events as ingest would write them: each partition's offsets contiguous from 0."""
    for s in range(start, start + n, chunk):
        t = synthetic(s, min(chunk, start + n - s), seed, items)
        parts = []
        ranges = []
        for p in range(PARTITIONS):
            rows = t.filter(pa.compute.equal(t["partition"], p))
            base = buffer.next_offsets().get(("events", p), 0)
            offs = pa.array(np.arange(base, base + rows.num_rows, dtype=np.int64))
            parts.append(rows.set_column(rows.schema.get_field_index("offset"), "offset", offs))
            if rows.num_rows:
                ranges.append(OffsetRange("events", p, base, base + rows.num_rows))
        buffer.append(pa.concat_tables(parts), ranges, writer="bench")


def round_config(storage: Path, epochs: int) -> RoundConfig:
    """One block, batches of 128, half replay, a gate that promotes every round: rounds whose
    cost is the buffer's, not the model's."""
    return small_round(
        storage, epochs, first_round_epochs=TrainerConfig().first_round_epochs, n_layers=1,
        batch_size=128, replay_ratio=0.5, tolerance=1.0, max_failures=0,
    )  # fmt: skip


def champion_over(buffer: EventBuffer, registry: Registry, cfg: RoundConfig) -> None:
    """The registry state that rounds over everything buffered leave: vocab, histories, champion."""
    table = buffer.read(columns=["user_id", "item_id", "ts", "partition", "offset"])
    vocab = ItemVocab()
    vocab.add(table["item_id"].to_pylist())
    history = UserHistories.from_sequences(user_sequences(table, vocab), cfg.model.max_len)
    model = Recommender(cfg.model, len(vocab))
    counts = np.bincount(np.asarray(vocab.encode(table["item_id"].to_pylist())),
                         minlength=len(vocab)).tolist()  # fmt: skip

    def write(d: Path) -> None:
        write_content(d, model, VersionContent(vocab, counts))
        Reservoir(cfg.replay.capacity, cfg.model.max_len).save(d)
        Reservoir(cfg.gate.replay_eval_size, cfg.model.max_len).save(d, name="replay_eval")
        history.save(d, None)

    meta = {"watermark": buffer.watermark(), "model_config": cfg.model.model_dump()}
    registry.register(write, meta, promote=True, reason="bench: state of the prefill")


def measure(
    size: int,
    new: int,
    where: tuple[str, StorageConfig],
    tmp: Path,
    epochs: int,
    cfg: RoundConfig | None = None,
) -> dict:
    """One round over ``new`` events after ``size`` buffered. With ``cfg`` (a cluster's: its
    Ray Train storage and node placement) the registry sits beside the buffer (``where``)."""
    location, storage = where
    buffer = EventBuffer(BufferConfig(path=location, storage=storage))
    t0 = time.monotonic()
    append(buffer, 0, size, 250_000)
    if cfg is None:
        cfg = round_config(tmp / "ray", epochs)
        registry = Registry(tmp / "registry")
    else:
        registry = Registry(f"{location.rstrip('/')}-registry", storage=storage)
    champion_over(buffer, registry, cfg)
    setup_s = time.monotonic() - t0
    append(buffer, size, new, new)
    loop = ContinualLoop(buffer, registry, cfg, LoopConfig(min_round_events=100,
                         round_on_cluster=True), tmp / "loop.json")  # fmt: skip
    t1 = time.monotonic()
    try:
        result = loop.run_once()
    finally:
        loop.close()
    round_s = time.monotonic() - t1
    if result is None:
        raise RuntimeError(f"the round over {size} buffered events did not run: {loop.last_skip}")
    rec = loop.state()["rounds"][-1]
    return {"buffered": size, "new": result.new_events, "segments_read": rec["segments"],
            "round_s": round_s, "read_s": rec["read_s"], "train_s": result.train_s,
            "setup_s": setup_s, "phases": rec["phases"]}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="sizes 100k/400k/1M, 1 epoch")
    ap.add_argument("--sizes", default="100000,1000000,5000000")
    ap.add_argument("--new", type=int, default=20_000)
    ap.add_argument("--storage", choices=["local", "s3"], default="local")
    ap.add_argument("--no-warmup", action="store_true", help="skip the unreported first round")
    args = ap.parse_args()
    sizes = [100_000, 400_000, 1_000_000] if args.quick else [int(x) for x in args.sizes.split(",")]
    epochs = 1 if args.quick else 2

    import ray

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    exit_on_sigterm()  # Ray's handler would end us with no clean-up
    server = None
    rows = []
    try:
        if args.storage == "s3":
            from harness.s3server import S3Server

            server = S3Server(Path(tempfile.mkdtemp(prefix="bench-s3-"))).start()
            server.create_bucket("bench")
        # The first round in a Ray session pays worker start-up and imports: run one unreported.
        plan = ([sizes[0]] if not args.no_warmup else []) + sizes
        for i, size in enumerate(plan):
            tmp = Path(tempfile.mkdtemp(prefix=f"round-cost-{size}-"))
            try:
                if server is not None:
                    where = (f"s3://bench/{size}-{time.time_ns()}",
                             StorageConfig(options=server.options()))  # fmt: skip
                else:
                    where = (str(tmp / "buffer"), StorageConfig())
                rows.append(measure(size, args.new, where, tmp, epochs))
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            if i == 0 and not args.no_warmup:
                print(f"(warm-up round over {size:,} buffered: {rows.pop()['round_s']:.1f}s)")
                continue
            r = rows[-1]
            line = (
                f"{r['buffered']:>10,} buffered  round {r['round_s']:6.1f}s  "
                f"read {r['read_s']:5.2f}s  train {r['train_s']:5.1f}s  "
                f"rest {r['round_s'] - r['train_s']:5.1f}s  "
                f"segments {r['segments_read']}  (setup {r['setup_s']:.0f}s)  phases "
                + " ".join(f"{k} {v:.2f}" for k, v in r["phases"].items())
            )
            print(line, flush=True)
    finally:
        if server is not None:
            server.stop()
        ray.shutdown()
    round_s = {str(r["buffered"]): round(r["round_s"], 2) for r in rows}
    read_s = {str(r["buffered"]): round(r["read_s"], 3) for r in rows}
    rest_s = {str(r["buffered"]): round(r["round_s"] - r["train_s"], 2) for r in rows}
    summary = {
        "bench": "round_cost",
        "storage": "s3" if args.storage == "s3" else "file",
        "new_events": args.new,
        "round_s_by_buffered": round_s,
        "read_s_by_buffered": read_s,
        "rest_s_by_buffered": rest_s,
        "round_cost_growth": round(rows[-1]["round_s"] / rows[0]["round_s"], 3),
        "read_cost_growth": round(rows[-1]["read_s"] / max(rows[0]["read_s"], 1e-9), 3),
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
