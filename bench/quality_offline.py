"""The offline part of ``bench.quality``: leave-one-out training over seeds (``run_offline``),
the popularity baselines (with recency: ``recent_popularity``), the MMR diversity trade-off of
the served top 10 (``diversity_tradeoff``), and their tables."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch
from rich.table import Table

from bench.quality_common import log, mean_std
from bench.quality_config import QualityConfig
from harness.strategies import train_selected
from training.evaluation import (
    Interactions,
    LooSplit,
    Metrics,
    ModelScorer,
    PopularityScorer,
    evaluate_cases,
    leave_one_out,
)
from training.ranking import top_k

NEGATIVES_NOTE = "100 per case, uniform, without replacement, from items the user never touched"


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
        stream = cfg.stream.seeded(seed)

        def on_epoch(epoch: int, ndcg: float, seed: int = seed) -> None:
            log(f"offline seed {seed} epoch {epoch + 1}: valid NDCG@10 full {ndcg:.4f}", t0)

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
        "model": {k: mean_std([r[k] for r in runs]) for k in keys},
        "runs": runs,
        "popularity": _metrics_dict(pop_m),
        "recent_popularity": {**_metrics_dict(recent_m), "half_life_events": round(half_life)},
        "cases": pop_m.cases,
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


def offline_table(off: dict[str, Any]) -> Table:
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


def diversity_table(rows: list[dict[str, float]]) -> Table:
    table = Table(title="Diversity (MMR, as served) vs accuracy on the offline test users")
    for col in ("diversity", "NDCG@10 full", "intra-list diversity"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(f"{r['diversity']:.2f}", f"{r['ndcg10']:.4f}", f"{r['ild']:.4f}")
    return table
