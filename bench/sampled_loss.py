"""Sampled against full softmax, offline on MovieLens-100K (or a CSV), the same seeds.

    python -m bench.sampled_loss                  # full, sampled with 64 negatives; seeds 0-2
    python -m bench.sampled_loss --negatives 32 64 256 --seeds 3

Each loss trains with ``bench.quality``'s offline protocol (leave-one-out, the epoch chosen on
validation NDCG@10, at most 40 epochs) and the product's recipe; only ``ModelConfig.loss`` and
``num_negatives`` differ. Test NDCG@10 and HR@10 are full-ranking (every item scored, the
user's seen items excluded). The sampled softmax is the one ``loss='auto'`` picks for catalogs
above ``sampled_above`` rows; here it is forced on a small catalog so the two can be compared
where the full softmax is still affordable, and it trains the item table row-wise as the product
does with it (``trainer.row_wise_table``; ``--dense-reference`` adds the same losses with the
table trained dense). Goal (issue "internet scale"): at most 64 negatives
within 2% (relative) of the full softmax's NDCG@10, mean of the same 3 seeds.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from bench.quality_config import QualityConfig
from bench.quality_offline import run_offline
from harness.prequential import StreamConfig
from training.config import ModelConfig
from training.evaluation import encode, load_table

GOAL_NEGATIVES, GOAL_REL = 64, 0.02


def one_loss(inter: Any, loss: str, negatives: int | None, seeds: int, data: Path | None,
             row_wise: bool = True) -> dict[str, Any]:  # fmt: skip
    model = ModelConfig(loss=loss, num_negatives=negatives or 256)  # type: ignore[arg-type]
    # The benchmark's own trainer (its batch and weight decay), with the item table's update set.
    trainer = StreamConfig().trainer.model_copy(update={"row_wise_table": row_wise})
    stream = StreamConfig(model=model, trainer=trainer)
    cfg = QualityConfig(data=data, seeds=seeds, offline_only=True, stream=stream)
    t0 = time.perf_counter()
    off = run_offline(inter, cfg, t0)
    return {
        "loss": loss,
        "negatives": negatives,
        "item_table": "dense" if loss == "full" or not row_wise else "rows",
        "share_of_catalog": None if negatives is None else round(negatives / inter.n_items, 4),
        "ndcg10": off["model"]["ndcg10_full"],
        "hr10": off["model"]["hr10_full"],
        "train_s": off["model"]["train_s"],
        "best_epoch": off["model"]["best_epoch"],
        "runs": off["runs"],
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.sampled_loss", description=__doc__)
    p.add_argument("--data", type=Path, help="user,item,ts[,rating] CSV (default MovieLens-100K)")
    p.add_argument("--negatives", type=int, nargs="+", default=[GOAL_NEGATIVES],
                   help="sampled-softmax negatives to compare (default 64)")  # fmt: skip
    p.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 (default 3)")
    p.add_argument("--dense-reference", action="store_true",
                   help="also train the sampled losses with the item table dense "
                   "(trainer.row_wise_table=False)")  # fmt: skip
    a = p.parse_args(argv)
    torch.set_num_threads(2)
    inter = encode(load_table(a.data))
    rows = [one_loss(inter, "full", None, a.seeds, a.data)]
    rows += [one_loss(inter, "sampled", k, a.seeds, a.data) for k in a.negatives]
    if a.dense_reference:
        rows += [one_loss(inter, "sampled", k, a.seeds, a.data, False) for k in a.negatives]
    full = rows[0]["ndcg10"]["mean"]
    table = Table(title=f"sampled vs full softmax, {inter.n_items} items, {a.seeds} seeds")
    for col in ("loss", "item table", "negatives", "% catalog", "NDCG@10", "vs full", "HR@10",
                "train s", "best epoch"):  # fmt: skip
        table.add_column(col)
    for r in rows:
        r["ndcg10_vs_full"] = round(r["ndcg10"]["mean"] / full - 1.0, 4)
        share = r["share_of_catalog"]
        table.add_row(
            r["loss"], r["item_table"], "-" if r["negatives"] is None else str(r["negatives"]),
            "-" if share is None else f"{100 * share:.1f}",
            f"{r['ndcg10']['mean']:.4f} ± {r['ndcg10']['std']:.4f}",
            f"{100 * r['ndcg10_vs_full']:+.1f}%",
            f"{r['hr10']['mean']:.4f}", f"{r['train_s']['mean']:.0f}",
            f"{r['best_epoch']['mean']:.0f}",
        )  # fmt: skip
    Console(width=120).print(table)
    product = [r for r in rows[1:] if r["item_table"] == "rows"]  # what loss='auto' trains
    at_goal = [r for r in product if r["negatives"] <= GOAL_NEGATIVES]
    met = None if not at_goal else any(r["ndcg10_vs_full"] >= -GOAL_REL for r in at_goal)
    print(json.dumps({
        "bench": "sampled_loss", "dataset": str(a.data) if a.data else "movielens-100k",
        "items": inter.n_items, "seeds": a.seeds, "rows": rows,
        "goal_within_2pct_at_64": met,
    }), flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
