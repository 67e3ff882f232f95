"""Recommendation quality: offline leave-one-out and streaming (prequential) strategies.

    python -m bench.quality                       # MovieLens-100K, offline + streaming
    python -m bench.quality --data mine.csv       # user,item,ts[,rating] (header optional)
    python -m bench.quality --offline-only --quick --chunks 10 --seed 0 --seeds 1 --out ./out

Offline: leave-one-out (validation = second-last event, test = last), HR@10 and NDCG@10 with full
ranking (seen items excluded, target kept) and with 100 negatives sampled uniformly without
replacement from the items the user never interacted with; beside two baselines scored on the
very same cases and negatives: popularity, and popularity with recency (its half-life chosen on
validation). Training stops after ``patience`` epochs without a better validation NDCG@10 and the
best epoch is reported on test; ``--seeds N`` runs it with N seeds and reports mean ± std.

Streaming: ``harness.prequential`` (protocol, forgetting and strategy definitions there), plus
``product`` (``harness.product_stream``): the product's own rounds (Ray Train + DeepSpeed, gate,
registry, carry) with its default settings, scored as the others; ``--strategies`` runs a subset
(and then skips the cold-item table, which belongs to the full run). The
cold-item table runs the replay strategy (the production recipe) once per item representation
(``ModelConfig.item_repr``: id, text, id+text; text = the dataset's titles, MiniLM; plus id with
the title init production rounds use for new ID rows, ``text_init``) and seed, and
scores each round's held-out events right after that round, pooled over rounds: all of them, and
those whose item is cold (first seen in that round's chunk). All
training but ``product``'s runs in this process with the trainer's ``training.fit`` loop on one
worker, not on Ray: the benchmark compares learning strategies, not distribution.

Progress goes to stderr; stdout gets the tables and, last, exactly one JSON line. The flags and
``QualityConfig`` are in ``bench.quality_config``, the offline part in ``bench.quality_offline``;
this module runs the streaming and cold-item parts and assembles the record.
"""

from __future__ import annotations

import json
import time
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from bench.cold_items import ITEM_REPRS, ColdItemsRun, cold_items_run
from bench.quality_common import log, mean_std
from bench.quality_config import ALL_STRATEGIES, QualityConfig, parse_args
from bench.quality_offline import NEGATIVES_NOTE, diversity_table, offline_table, run_offline
from harness.prequential import (
    STRATEGIES,
    StrategyResult,
    build_chunks,
    plot_stream,
    run_stream,
    stream_table,
)
from harness.product_stream import product_goal, run_product
from harness.strategies import ModelStrategy, train_from_scratch
from training.evaluation import Interactions, encode, load_table

TRAINING_NOTE = (
    "in-process, single worker (training.fit + AdamW), not Ray/DeepSpeed: this benchmark "
    "measures the learning strategy, not distribution"
)
PRODUCT_NOTE = (
    "the product's rounds (run_round, default settings, gate, registry) on a long-lived Ray "
    "Train + DeepSpeed run, train s = wall time of a chunk's rounds"
)


def run_streaming(
    inter: Interactions, cfg: QualityConfig, t0: float
) -> tuple[list[StrategyResult], float, dict[str, Any] | None]:
    """Pretrain once on chunk 0, then every strategy streams over the remaining chunks; the
    product strategy (if chosen) last, its first version trained by its own first round."""
    chunks = build_chunks(inter, cfg.chunks, cfg.max_stream_cases, cfg.seed)

    def on_round(k: int, res: StrategyResult) -> None:
        log(
            f"{res.name} chunk {k}: stream NDCG@10 {res.stream_ndcg10[-1]:.4f}, "
            f"train {res.train_s[-1]:.1f}s",
            t0,
        )

    results: list[StrategyResult] = []
    pretrain_s = 0.0
    names = [n for n in cfg.strategies if n in STRATEGIES]
    if names:
        t_pre = time.perf_counter()
        pretrained = train_from_scratch(
            inter, chunks[0].train_rows, cfg.stream, cfg.stream.pretrain_epochs
        )
        pretrain_s = time.perf_counter() - t_pre
        log(f"pretrained on chunk 0 ({len(chunks[0].train_rows)} events) in {pretrain_s:.1f}s",
             t0)  # fmt: skip
        strategies = [ModelStrategy(name, inter, cfg.stream, pretrained) for name in names]
        results = run_stream(chunks, strategies, on_round)
    product = None
    if "product" in cfg.strategies:
        res, product = run_product(inter, chunks, cfg.product, on_round, lambda m: log(m, t0))
        results.append(res)
    return results, pretrain_s, product


def run_cold_items(inter: Interactions, cfg: QualityConfig, t0: float) -> dict[str, Any]:
    """Per seed and item representation: replay over the chunks; mean and std over the seeds."""
    chunks = build_chunks(inter, cfg.chunks, cfg.max_stream_cases, cfg.seed)
    runs: dict[str, list[ColdItemsRun]] = {r: [] for r in ITEM_REPRS}
    for k in range(cfg.seeds):
        for item_repr in ITEM_REPRS:
            run = cold_items_run(inter, chunks, cfg.stream, item_repr, cfg.seed + k)
            runs[item_repr].append(run)
            log(f"cold items, {item_repr}, seed {run.seed}: NDCG@10 all {run.all_ndcg10:.4f}, "
                 f"cold {run.cold_ndcg10:.4f} ({run.n_cold_targets} cold targets)", t0)  # fmt: skip
    out: dict[str, Any] = {}
    for item_repr, rs in runs.items():
        a, c = mean_std([r.all_ndcg10 for r in rs]), mean_std([r.cold_ndcg10 for r in rs])
        out[item_repr] = {
            "all": a["mean"], "all_std": a["std"], "cold": c["mean"], "cold_std": c["std"],
            "n_targets": rs[0].n_targets, "n_cold_targets": rs[0].n_cold_targets,
            "stream_ndcg10": mean_std([r.stream_ndcg10 for r in rs])["mean"],
            "train_s": mean_std([r.train_s for r in rs])["mean"],
            "per_seed": [{"seed": r.seed, "all": round(r.all_ndcg10, 4),
                          "cold": round(r.cold_ndcg10, 4)} for r in rs],
        }  # fmt: skip
    return out


def cold_items_goal(cold: dict[str, Any]) -> dict[str, float | bool]:
    """id+text minus id on cold targets against the seed-to-seed spread (the larger std)."""
    margin = cold["id+text"]["cold"] - cold["id"]["cold"]
    spread = max(cold["id+text"]["cold_std"], cold["id"]["cold_std"])
    return {"margin": round(margin, 4), "spread": spread, "beats": margin > spread > 0.0}


def _cold_table(cold: dict[str, Any], seeds: int) -> Table:
    table = Table(
        title="Cold items: replay per item representation, each round's held-out events right "
        f"after it (mean ± std over {seeds} seed{'s' if seeds > 1 else ''})"
    )
    table.add_column("item rows")
    for col in ("NDCG@10 all", "NDCG@10 cold items", "targets (cold)", "stream NDCG@10",
                "train s/round"):  # fmt: skip
        table.add_column(col, justify="right")
    for name, r in cold.items():
        table.add_row(
            name,
            f"{r['all']:.4f} ± {r['all_std']:.4f}",
            f"{r['cold']:.4f} ± {r['cold_std']:.4f}",
            f"{r['n_targets']} ({r['n_cold_targets']})",
            f"{r['stream_ndcg10']:.4f}",
            f"{r['train_s']:.2f}",
        )
    return table


def stream_goals(by_name: dict[str, StrategyResult], record: dict[str, Any],
                 console: Console) -> None:  # fmt: skip
    """The streaming goals whose strategies ran: into ``record`` and one console line each."""
    full, replay = by_name.get("full_retrain"), by_name.get("replay")
    ft, product = by_name.get("finetune"), by_name.get("product")
    goals = record["goals"]
    if full is not None and replay is not None:
        ndcg_ratio = replay.mean_stream_ndcg10 / full.mean_stream_ndcg10
        time_ratio = replay.mean_train_s / full.mean_train_s
        record["replay_over_full_ndcg"] = round(ndcg_ratio, 4)
        record["replay_over_full_train_s"] = round(time_ratio, 4)
        goals["replay_ndcg_ge_98pct_of_full"] = ndcg_ratio >= 0.98
        goals["replay_train_s_le_25pct_of_full"] = time_ratio <= 0.25
        console.print(f"replay / full_retrain: NDCG@10 {ndcg_ratio:.1%} (goal >= 98%), "
                      f"training time {time_ratio:.1%} (goal <= 25%)")  # fmt: skip
    if replay is not None and ft is not None:
        goals["replay_forgets_less_than_finetune"] = replay.forgetting < ft.forgetting
        console.print(f"forgetting: replay {replay.forgetting:+.4f} vs finetune "
                      f"{ft.forgetting:+.4f}")  # fmt: skip
    if full is not None and product is not None:
        ratio, line = product_goal(product, full, record["strategies"]["product"])
        record["product_over_full_ndcg"] = round(ratio, 4)
        goals["product_ndcg_ge_98pct_of_full"] = ratio >= 0.98
        console.print(line)


def run(cfg: QualityConfig, console: Console) -> dict[str, Any]:
    """The whole benchmark; prints the tables and returns the JSON record."""
    t0 = time.perf_counter()
    torch.set_num_threads(2)  # the benchmark box has 2 cores shared with other work
    cfg.out.mkdir(parents=True, exist_ok=True)
    inter = encode(load_table(cfg.data))
    log(f"{len(inter.items)} events, {len(inter.user_ids)} users, {inter.n_items} items", t0)
    record: dict[str, Any] = {
        "bench": "quality",
        "dataset": str(cfg.data) if cfg.data else "movielens-100k",
        "events": len(inter.items),
        "quick": cfg.quick,
        "seed": cfg.seed,
        "seeds": cfg.seeds,
        **_offline_record(inter, cfg, t0, console),
        "model": cfg.stream.model.model_dump(),
        "strategies": {},
        "cold_items": {},
        "replay_over_full_ndcg": None,
        "replay_over_full_train_s": None,
        "product_over_full_ndcg": None,
    }
    if not cfg.offline_only:
        _streaming(inter, cfg, t0, console, record)
    record["offline_beats_popularity"] = (
        None
        if record["popularity"] is None
        else record["offline_ndcg10_full"] > record["popularity"]["ndcg10_full"]
    )
    record["total_s"] = round(time.perf_counter() - t0, 1)
    (cfg.out / "quality.json").write_text(json.dumps(record, indent=2))
    return record


_OFFLINE_KEYS = (
    "offline_ndcg10_full", "offline_hr10_full", "offline_ndcg10_sampled", "offline_hr10_sampled",
    "offline_train_s", "offline_best_epoch", "offline_std", "offline_runs", "popularity",
    "recent_popularity", "diversity_tradeoff", "negatives",
)  # fmt: skip


def _offline_record(
    inter: Interactions, cfg: QualityConfig, t0: float, console: Console
) -> dict[str, Any]:
    """The offline table's fields; all null when it is skipped (not measured is not 0)."""
    if cfg.streaming_only:
        return dict.fromkeys(_OFFLINE_KEYS)
    off = run_offline(inter, cfg, t0)
    console.print(offline_table(off))
    console.print(diversity_table(off["diversity"]))
    return {
        "offline_ndcg10_full": off["model"]["ndcg10_full"]["mean"],
        "offline_hr10_full": off["model"]["hr10_full"]["mean"],
        "offline_ndcg10_sampled": off["model"]["ndcg10_sampled"]["mean"],
        "offline_hr10_sampled": off["model"]["hr10_sampled"]["mean"],
        "offline_train_s": off["model"]["train_s"]["mean"],
        "offline_best_epoch": off["model"]["best_epoch"]["mean"],
        "offline_std": {k: v["std"] for k, v in off["model"].items()},
        "offline_runs": off["runs"],
        "popularity": off["popularity"],
        "recent_popularity": off["recent_popularity"],
        "diversity_tradeoff": off["diversity"],
        "negatives": NEGATIVES_NOTE,
    }


def _streaming(
    inter: Interactions, cfg: QualityConfig, t0: float, console: Console, record: dict[str, Any]
) -> None:
    """The streaming comparison (and the cold-item table on a full run), into ``record``."""
    results, pretrain_s, product = run_streaming(inter, cfg, t0)
    by_name = {r.name: r for r in results}
    note = TRAINING_NOTE + (f"; product: {PRODUCT_NOTE}" if "product" in by_name else "")
    console.print(stream_table(results, f"Streaming, test-then-train over {cfg.chunks} "
                               f"chunks ({note})"))  # fmt: skip
    summaries = {r.name: r.summary() for r in results}
    if product is not None:
        summaries["product"].update(product)
    record.update(
        strategies=summaries,
        goals={},
        chunks=cfg.chunks,
        strategies_run=list(cfg.strategies),
        pretrain_s=round(pretrain_s, 1),
        stream_config=cfg.stream.record(),
        product_stream=cfg.product.model_dump(),
        full_retrain="from scratch every round (fresh model, same seed), epochs chosen on "
        "validation (each user's last event so far), early stopping",
        training=TRAINING_NOTE,
        product_training=PRODUCT_NOTE if "product" in cfg.strategies else None,
        plot=str(plot_stream(results, cfg.out / "quality_stream.png")),
    )
    stream_goals(by_name, record, console)
    if set(cfg.strategies) == set(ALL_STRATEGIES):  # the full run's table
        cold = run_cold_items(inter, cfg, t0)
        console.print(_cold_table(cold, cfg.seeds))
        goal = cold_items_goal(cold)
        record["cold_items"] = cold
        record["goals"]["id_text_beats_id_on_cold_by_more_than_spread"] = goal["beats"]
        record["cold_items_margin"] = goal
        console.print(
            f"cold items: id+text - id = {goal['margin']:+.4f} NDCG@10 "
            f"(seed-to-seed spread {goal['spread']:.4f})"
        )


def main(argv: list[str] | None = None) -> None:
    cfg = parse_args(argv, __doc__.split("\n")[0])
    record = run(cfg, Console(width=130))  # tables for logs, not an 80-column terminal
    print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
