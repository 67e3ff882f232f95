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

Progress goes to stderr; stdout gets the tables and, last, exactly one JSON line.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from rich.console import Console
from rich.table import Table

from bench.cold_items import ITEM_REPRS, ColdItemsRun, cold_items_run
from harness.prequential import (
    STRATEGIES,
    StrategyResult,
    StreamConfig,
    build_chunks,
    plot_stream,
    run_stream,
    stream_table,
)
from harness.product_stream import ProductStream, product_goal, run_product
from harness.strategies import ModelStrategy, train_from_scratch, train_selected
from training.evaluation import (
    Interactions,
    LooSplit,
    Metrics,
    ModelScorer,
    PopularityScorer,
    encode,
    evaluate_cases,
    leave_one_out,
    load_table,
)
from training.ranking import top_k

TRAINING_NOTE = (
    "in-process, single worker (training.fit + AdamW), not Ray/DeepSpeed: this benchmark "
    "measures the learning strategy, not distribution"
)
ALL_STRATEGIES = (*STRATEGIES, "product")
PRODUCT_NOTE = (
    "the product's rounds (run_round, default settings, gate, registry) on a long-lived Ray "
    "Train + DeepSpeed run, train s = wall time of a chunk's rounds"
)
NEGATIVES_NOTE = "100 per case, uniform, without replacement, from items the user never touched"
err = Console(stderr=True)


class QualityConfig(BaseModel):
    """Everything one run of the benchmark needs."""

    model_config = ConfigDict(extra="forbid")

    data: Path | None = Field(
        default=None, description="MovieLens-100K folder or user,item,ts[,rating] CSV; None = ML."
    )
    out: Path = Field(default=Path("out"), description="Folder for the plot and results.json.")
    chunks: int = Field(default=10, ge=2, description="Streaming chunks (chunk 0 pretrains).")
    seed: int = Field(default=0, description="Seeds training, negatives and subsampling.")
    seeds: int = Field(
        default=3, ge=1, description="Offline runs with seeds seed..seed+N-1 (mean and std)."
    )
    offline_only: bool = Field(default=False, description="Skip the streaming comparison.")
    streaming_only: bool = Field(
        default=False, description="Skip the offline table (its columns are null)."
    )
    quick: bool = Field(default=False, description="The ~2 minute smoke-test version.")
    offline_epochs: int = Field(
        default=40, ge=1, description="Max epochs of the offline model (early stopping ends most)."
    )
    negatives: int = Field(default=100, ge=1, description="Sampled negatives per case.")
    max_stream_cases: int = Field(
        default=2000, ge=1, description="Test events per chunk (seeded subsample, same for all)."
    )
    stream: StreamConfig = Field(
        default_factory=StreamConfig, description="How the streaming strategies train."
    )
    product: ProductStream = Field(
        default_factory=ProductStream, description="How the product strategy's rounds are fed."
    )
    strategies: tuple[str, ...] = Field(
        default=ALL_STRATEGIES,
        min_length=1,
        description="Streaming strategies to run; a subset skips the cold-item table.",
    )

    @field_validator("strategies")
    @classmethod
    def _known(cls, names: tuple[str, ...]) -> tuple[str, ...]:
        unknown = sorted(set(names) - set(ALL_STRATEGIES))
        if unknown:
            raise ValueError(f"unknown strategies {unknown}; choose among {ALL_STRATEGIES}")
        return tuple(n for n in ALL_STRATEGIES if n in names)  # the tables' fixed order

    @classmethod
    def quick_preset(cls, **overrides: Any) -> QualityConfig:
        """Fewer chunks, epochs and test events: the same code paths in about two minutes."""
        stream = StreamConfig(pretrain_epochs=6, update_epochs=2, full_epochs=4)
        base: dict[str, Any] = {
            "quick": True,
            "chunks": 4,
            "offline_epochs": 4,
            "max_stream_cases": 400,
            "stream": stream,
        }
        return cls(**{**base, **overrides})


def _log(msg: str, t0: float) -> None:
    err.print(f"[dim]{time.perf_counter() - t0:7.1f}s[/dim] {msg}")


def _metrics_dict(m: Metrics) -> dict[str, float]:
    return {
        "ndcg10_full": round(m.ndcg10_full, 4),
        "hr10_full": round(m.hr10_full, 4),
        "ndcg10_sampled": round(m.ndcg10_sampled, 4),
        "hr10_sampled": round(m.hr10_sampled, 4),
    }


HALF_LIVES = (0.01, 0.03, 0.1, 0.3, 1.0)  # recency popularity: fractions of the training events


def recent_popularity(inter: Interactions, split: LooSplit, valid_excl: list[np.ndarray],
                      cfg: QualityConfig) -> tuple[PopularityScorer, float]:  # fmt: skip
    """Popularity with recency, its half-life chosen on validation like the model's epoch."""
    train_items = inter.items[split.train_rows]
    best: tuple[float, float] = (-1.0, HALF_LIVES[0])
    for frac in HALF_LIVES:
        half_life = frac * len(train_items)
        pop = PopularityScorer(train_items, inter.n_items, half_life=half_life)
        m = evaluate_cases(pop, split.valid, inter.n_items, valid_excl, seed=cfg.seed,
                           negatives=cfg.negatives)  # fmt: skip
        best = max(best, (m.ndcg10_full, half_life))
    return PopularityScorer(train_items, inter.n_items, half_life=best[1]), best[1]


def run_offline(inter: Interactions, cfg: QualityConfig, t0: float) -> dict[str, Any]:
    """Per seed: train on leave-one-out train rows with the epoch chosen (and training stopped)
    by validation NDCG@10, score test; then mean and standard deviation over the seeds."""
    split = leave_one_out(inter)
    full_seqs = [inter.items[rows] for rows in inter.rows_by_user()]
    valid_excl = [full_seqs[c.user] for c in split.valid]
    test_excl = [full_seqs[c.user] for c in split.test]
    runs: list[dict[str, Any]] = []
    model = vocab = None
    for k in range(cfg.seeds):
        seed = cfg.seed + k
        stream = cfg.stream.model_copy(update={"seed": seed})

        def on_epoch(epoch: int, ndcg: float, seed: int = seed) -> None:
            _log(f"offline seed {seed} epoch {epoch + 1}: valid NDCG@10 full {ndcg:.4f}", t0)

        t_train = time.perf_counter()
        chosen = train_selected(inter, split.train_rows, split.valid, stream, cfg.offline_epochs,
                                on_epoch)  # fmt: skip
        train_s = time.perf_counter() - t_train
        scorer = ModelScorer(chosen.model, chosen.vocab, inter.item_ids)
        # Negatives seeded differently from validation so test is not tuned on the same draws.
        m = evaluate_cases(scorer, split.test, inter.n_items, test_excl, seed=cfg.seed + 1,
                           negatives=cfg.negatives)  # fmt: skip
        runs.append({**_metrics_dict(m), "train_s": round(train_s, 1),
                     "best_epoch": chosen.best_epoch, "epochs_run": chosen.epochs_run,
                     "valid_ndcg10_full": round(chosen.valid_ndcg10, 4), "seed": seed})  # fmt: skip
        if k == 0:
            model, vocab = chosen.model, chosen.vocab
    assert model is not None and vocab is not None  # cfg.seeds >= 1
    pop = PopularityScorer(inter.items[split.train_rows], inter.n_items)
    pop_m = evaluate_cases(
        pop, split.test, inter.n_items, test_excl, seed=cfg.seed + 1, negatives=cfg.negatives
    )
    recent, half_life = recent_popularity(inter, split, valid_excl, cfg)
    recent_m = evaluate_cases(
        recent, split.test, inter.n_items, test_excl, seed=cfg.seed + 1, negatives=cfg.negatives
    )
    tradeoff = diversity_tradeoff(
        ModelScorer(model, vocab, inter.item_ids), model, split.test, test_excl
    )
    keys = ("ndcg10_full", "hr10_full", "ndcg10_sampled", "hr10_sampled", "train_s", "best_epoch")
    return {
        "diversity": tradeoff,
        "model": {k: _mean_std([r[k] for r in runs]) for k in keys},
        "runs": runs,
        "popularity": _metrics_dict(pop_m),
        "recent_popularity": {**_metrics_dict(recent_m), "half_life_events": round(half_life)},
        "cases": pop_m.cases,
    }


def _mean_std(xs: list[float]) -> dict[str, float]:
    """Mean and sample standard deviation (0 for a single seed)."""
    a = np.asarray(xs, dtype=np.float64)
    return {
        "mean": round(float(a.mean()), 4),
        "std": round(float(a.std(ddof=1)) if len(a) > 1 else 0.0, 4),
    }


DIVERSITY_LEVELS = (0.0, 0.25, 0.5, 0.75)


@torch.no_grad()
def diversity_tradeoff(
    scorer: ModelScorer, model: Any, cases: list[Any], seen: list[np.ndarray], max_cases: int = 1000
) -> list[dict[str, float]]:
    """NDCG@10 and intra-list diversity of the served top 10 at each MMR ``diversity`` level.

    The same re-ranking the Serve app applies (``serving.mmr``) over the model's item rows, on
    the top 100 by score with seen items excluded; ILD = mean pairwise (1 - cosine) in that space.
    """
    from serving.mmr import intra_list_diversity, mmr

    rows = torch.from_numpy(scorer.code_to_row)
    emb = torch.nn.functional.normalize(model.item_embeddings().detach().float()[rows], dim=1)
    part = cases[:max_cases]
    scores = torch.from_numpy(scorer.score([c.history for c in part]))
    out = []
    for lam in DIVERSITY_LEVELS:
        gains, ild = [], []
        for b, case in enumerate(part):
            sc = scores[b]
            cand = top_k(sc, 100, exclude=seen[b][seen[b] != case.target].tolist())
            picked = mmr(sc, emb, cand, 10, lam)
            pos = picked.index(case.target) if case.target in picked else -1
            gains.append(1.0 / np.log2(pos + 2) if pos >= 0 else 0.0)
            ild.append(intra_list_diversity(picked, emb))
        out.append({"diversity": lam, "ndcg10": float(np.mean(gains)), "ild": float(np.mean(ild))})
    return out


def run_streaming(
    inter: Interactions, cfg: QualityConfig, t0: float
) -> tuple[list[StrategyResult], float, dict[str, Any] | None]:
    """Pretrain once on chunk 0, then every strategy streams over the remaining chunks; the
    product strategy (if chosen) last, its first version trained by its own first round."""
    chunks = build_chunks(inter, cfg.chunks, cfg.max_stream_cases, cfg.seed)

    def on_round(k: int, res: StrategyResult) -> None:
        _log(
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
        _log(f"pretrained on chunk 0 ({len(chunks[0].train_rows)} events) in {pretrain_s:.1f}s",
             t0)  # fmt: skip
        strategies = [ModelStrategy(name, inter, cfg.stream, pretrained) for name in names]
        results = run_stream(chunks, strategies, on_round)
    product = None
    if "product" in cfg.strategies:
        res, product = run_product(inter, chunks, cfg.product, on_round, lambda m: _log(m, t0))
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
            _log(f"cold items, {item_repr}, seed {run.seed}: NDCG@10 all {run.all_ndcg10:.4f}, "
                 f"cold {run.cold_ndcg10:.4f} ({run.n_cold_targets} cold targets)", t0)  # fmt: skip
    out: dict[str, Any] = {}
    for item_repr, rs in runs.items():
        a, c = _mean_std([r.all_ndcg10 for r in rs]), _mean_std([r.cold_ndcg10 for r in rs])
        out[item_repr] = {
            "all": a["mean"], "all_std": a["std"], "cold": c["mean"], "cold_std": c["std"],
            "n_targets": rs[0].n_targets, "n_cold_targets": rs[0].n_cold_targets,
            "stream_ndcg10": _mean_std([r.stream_ndcg10 for r in rs])["mean"],
            "train_s": _mean_std([r.train_s for r in rs])["mean"],
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


def _offline_table(off: dict[str, Any]) -> Table:
    n = len(off["runs"])
    table = Table(
        title=f"Offline leave-one-out ({off['cases']} users, test = last event; "
        f"transformer: mean ± std over {n} seed{'s' if n > 1 else ''})"
    )
    table.add_column("model")
    cols = ("ndcg10_full", "hr10_full", "ndcg10_sampled", "hr10_sampled")
    for col in ("NDCG@10 full", "HR@10 full", "NDCG@10 sampled", "HR@10 sampled", "train s",
                "best epoch"):  # fmt: skip
        table.add_column(col, justify="right")
    m = off["model"]
    table.add_row(
        "transformer",
        *(f"{m[k]['mean']:.4f} ± {m[k]['std']:.4f}" for k in cols),
        f"{m['train_s']['mean']:.1f} ± {m['train_s']['std']:.1f}",
        f"{m['best_epoch']['mean']:.1f}",
    )
    rp = off["recent_popularity"]
    recency = f"popularity, recency (half-life {rp['half_life_events']} events)"
    for name, p in (("popularity", off["popularity"]), (recency, rp)):
        table.add_row(name, *(f"{p[k]:.4f}" for k in cols), "", "")
    return table


def _diversity_table(rows: list[dict[str, float]]) -> Table:
    table = Table(title="Diversity (MMR, as served) vs accuracy on the offline test users")
    for col in ("diversity", "NDCG@10 full", "intra-list diversity"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(f"{r['diversity']:.2f}", f"{r['ndcg10']:.4f}", f"{r['ild']:.4f}")
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
    _log(f"{len(inter.items)} events, {len(inter.user_ids)} users, {inter.n_items} items", t0)
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
    console.print(_offline_table(off))
    console.print(_diversity_table(off["diversity"]))
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
        stream_config=cfg.stream.model_dump(exclude={"model"}),
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


def parse_args(argv: list[str] | None = None) -> QualityConfig:
    p = argparse.ArgumentParser(prog="python -m bench.quality", description=__doc__.split("\n")[0])
    p.add_argument("--data", type=Path, help="user,item,ts[,rating] CSV (default MovieLens-100K)")
    p.add_argument("--chunks", type=int, help="streaming chunks (default 10; 4 with --quick)")
    p.add_argument("--seed", type=int, default=0, help="first seed (default 0)")
    p.add_argument("--seeds", type=int, default=3, help="offline seeds, mean ± std (default 3)")
    p.add_argument("--out", type=Path, default=Path("out"), help="output folder (default ./out)")
    p.add_argument("--offline-only", action="store_true", help="skip the streaming comparison")
    p.add_argument("--streaming-only", action="store_true", help="skip the offline table")
    p.add_argument("--quick", action="store_true", help="~2 minute version (smoke test)")
    p.add_argument(
        "--strategies",
        help="comma-separated streaming strategies (default: all: "
        f"{','.join(ALL_STRATEGIES)}); a subset skips the cold-item table",
    )
    p.add_argument("--round-events", type=int, help="product: events per round (default 300)")
    a = p.parse_args(argv)
    if a.data is not None and not a.data.exists():
        p.error(f"--data {a.data} does not exist; pass a CSV with user,item,ts[,rating] rows")
    over: dict[str, Any] = {"data": a.data, "seed": a.seed, "seeds": a.seeds, "out": a.out}
    if a.offline_only and a.streaming_only:
        p.error("--offline-only and --streaming-only leave nothing to run; pass one of them")
    over["offline_only"], over["streaming_only"] = a.offline_only, a.streaming_only
    if a.chunks is not None:
        over["chunks"] = a.chunks
    if a.strategies is not None:
        over["strategies"] = tuple(n.strip() for n in a.strategies.split(",") if n.strip())
    if a.round_events is not None:
        over["product"] = ProductStream(round_events=a.round_events)
    try:
        cfg = QualityConfig.quick_preset(**over) if a.quick else QualityConfig(**over)
    except ValidationError as err:
        p.error(str(err))
    # Seeds flow into the training config too, so --seed changes model init and shuffles.
    cfg.stream = cfg.stream.model_copy(update={"seed": a.seed})
    return cfg


def main(argv: list[str] | None = None) -> None:
    cfg = parse_args(argv)
    record = run(cfg, Console(width=130))  # tables for logs, not an 80-column terminal
    print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
