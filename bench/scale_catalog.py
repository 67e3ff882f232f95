"""``bench.scale``'s catalog part: one real round over a catalog of N items."""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.round_cost import append
from harness.sigterm import exit_on_sigterm
from streams.buffer import EventBuffer
from streams.config import BufferConfig
from training.config import TrainerConfig
from training.round import RoundConfig


def _champion(registry: Any, cfg: RoundConfig, items: int) -> None:
    """What rounds over a catalog of ``items`` leave: its item map and table, no users yet."""
    from training.histories import UserHistories, save_chain
    from training.model import Recommender
    from training.registry import VersionContent, write_content
    from training.replay import Reservoir
    from training.vocab import ItemVocab

    vocab = ItemVocab([f"i{i}" for i in range(items)])
    model = Recommender(cfg.model, len(vocab))

    def write(d: Path) -> None:
        write_content(d, model, VersionContent(vocab))
        Reservoir(cfg.replay.capacity, cfg.model.max_len).save(d)
        Reservoir(cfg.gate.replay_eval_size, cfg.model.max_len).save(d, name="replay_eval")
        save_chain(UserHistories(cfg.model.max_len).table(), d, None)

    meta = {"watermark": {}, "model_config": cfg.model.model_dump()}
    registry.register(write, meta, promote=True, reason=f"bench: a {items:,}-item catalog")


def catalog_row(items: int, events: int, seed: int, row_wise: bool = True) -> dict[str, Any]:
    """One round of ``events`` new events after a champion over ``items`` items; ``row_wise``
    False trains the item table dense (the reference for ``trainer.row_wise_table``)."""
    import ray

    from services.config import LoopConfig
    from services.loop import ContinualLoop
    from training.registry import Registry

    tmp = Path(tempfile.mkdtemp(prefix=f"bench-scale-catalog-{items}-"))
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    exit_on_sigterm()  # Ray's handler would end us with no clean-up
    try:
        trainer = TrainerConfig(storage_path=tmp / "ray", row_wise_table=row_wise)
        cfg = RoundConfig(trainer=trainer)
        buffer = EventBuffer(BufferConfig(path=tmp / "buffer"))
        registry = Registry(tmp / "registry")
        _champion(registry, cfg, items)
        append(buffer, 0, events, events, items, seed)
        # One round over all the events (loop.max_round_events would split them): the workload.
        lcfg = LoopConfig(min_round_events=100, max_round_events=events, round_on_cluster=True)
        loop = ContinualLoop(buffer, registry, cfg, lcfg, tmp / "loop.json")
        t0 = time.monotonic()
        try:
            result = loop.run_once()
        finally:
            loop.close()
        wall = time.monotonic() - t0
        if result is None:
            raise RuntimeError(f"the round over {items:,} items did not run: {loop.last_skip}")
        return {
            "items": items,
            "events": result.new_events,
            "loss": _loss(cfg, items),
            "table": "rows" if result.metrics.get("train_row_wise_table") else "dense",
            "samples_per_s": result.metrics.get("train_samples_per_s"),
            "train_s": result.train_s,
            "round_s": wall,
        }
    finally:
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)


def _loss(cfg: RoundConfig, items: int) -> str:
    """The loss a round picks for this catalog (``Recommender.samples_loss``'s rule)."""
    m = cfg.model
    sampled = m.loss == "sampled" or (m.loss == "auto" and items + 1 > m.sampled_above)
    return "sampled" if sampled and m.num_negatives < items else "full"
