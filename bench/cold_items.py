"""The cold-item table: does an item representation place items no round has trained on yet?

``cold_items_run``: the replay strategy (``harness.prequential``) with one item representation
(``ModelConfig.item_repr``); the ranks of each round's held-out events right after that round are
pooled over rounds 1..F, and scored on all of them and on those whose target is a cold item,
first seen in that chunk (``cold_targets``): no model saw it before the round, which trained on its
few other events of the chunk at most.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from harness.prequential import Chunk, StreamConfig, run_stream
from harness.strategies import ModelStrategy, train_from_scratch
from training.evaluation import Interactions, ndcg_hr

# The cold-item table's options: name -> (ModelConfig.item_repr, ModelConfig.text_init).
# "id+title init" is the ID model as production rounds run it by default: new rows start from a
# ridge map of their titles (training.textinit.init_rows) instead of the mean of known rows.
ITEM_REPRS: dict[str, tuple[str, bool]] = {
    "id": ("id", False),
    "id+title init": ("id", True),
    "text": ("text", False),
    "id+text": ("id+text", False),
}


def cold_targets(chunk: Chunk) -> np.ndarray:
    """[len(chunk.holdout)] bool: the target is a cold item, first seen in this chunk (no model
    trained on it before this chunk's round)."""
    return np.array([c.target > chunk.known_items for c in chunk.holdout], dtype=bool)


@dataclass(frozen=True)
class ColdItemsRun:
    """The replay strategy with one item representation: NDCG@10 right after each round on that
    round's held-out events (pooled over rounds 1..F), all of them and those of cold items."""

    item_repr: str
    seed: int
    all_ndcg10: float
    cold_ndcg10: float
    n_targets: int
    n_cold_targets: int
    stream_ndcg10: float
    train_s: float


def cold_items_run(
    inter: Interactions, chunks: Sequence[Chunk], cfg: StreamConfig, option: str, seed: int
) -> ColdItemsRun:
    """Pretrain on chunk 0 and stream with ``replay`` (the production recipe) with one of the
    ``ITEM_REPRS`` options.

    Held-out events are never trained on, so a cold target's item was learned from at most its
    few other events in the same chunk (or none: then only its title can place it).
    """
    item_repr, text_init = ITEM_REPRS[option]
    model = cfg.model.model_copy(update={"item_repr": item_repr, "text_init": text_init})
    run_cfg = cfg.seeded(seed).model_copy(update={"model": model})
    pretrained = train_from_scratch(inter, chunks[0].train_rows, run_cfg, run_cfg.pretrain_epochs)
    res = run_stream(chunks, [ModelStrategy("replay", inter, run_cfg, pretrained)])[0]
    ranks = np.concatenate(res.just_learned_ranks[1:])
    cold = np.concatenate([cold_targets(c) for c in chunks[1:]])
    return ColdItemsRun(
        item_repr=option,
        seed=seed,
        all_ndcg10=ndcg_hr(ranks)[0],
        cold_ndcg10=ndcg_hr(ranks[cold])[0] if cold.any() else float("nan"),
        n_targets=int(ranks.size),
        n_cold_targets=int(cold.sum()),
        stream_ndcg10=res.mean_stream_ndcg10,
        train_s=res.mean_train_s,
    )
