"""Live evaluation, offline: do interleaved rankings decide, and how much sooner than an A/B?

    python -m bench.live            # all replayed requests, 20 epochs, 500 trials per pair
    python -m bench.live --quick    # 4,000 requests, 8 epochs, 200 trials per pair

MovieLens-100K in time order: a champion trains on the first ``train_share`` of the events
(``bench.live_models``), the rest is replayed as requests. Pairs (champion a, candidate b):
``clearly_worse`` (b = a with its item rows shuffled); ``subtly_worse`` (b = a plus weight noise
tuned to lose ``subtle_gap`` of its next-slice NDCG@10) and ``subtly_worse_epoch`` (b = an earlier
epoch of a's own training run, 5-10% lower); ``better`` (a = the champion plus noise tuned so
that the champion, now b, is ``better_gain`` higher) and ``better_epoch`` (a = an earlier epoch
that the champion, b, beats by at most 15%); ``same`` (b = a's weights rebuilt as another model,
scored separately). An epoch pair with no epoch inside the issue's range is not built, and says
so. Each pair runs ``trials`` interleaved trials and as many A/B trials (``bench.live_trials``:
what an impression is, the A/B design and why it is fair), through the product's
``serving.interleaving`` and ``training.sequential`` and the click model ``services.click_model``,
whose parameters are fixed by the flags before anything is measured.

Reported per pair: offline NDCG@10 of both versions, their relative difference and its paired
bootstrap p-value over users; for interleaving, the share of trials decided correctly within the
issue's budget, the median impressions to a decision (undecided trials count at the cap), wrong
decisions; for the A/B, the same run to 10x the interleaving median, with the trials that hit that
cap; and interleaving / A/B. And the floor of each pair's budget goal (``floor_impressions``): the
impressions that even a fixed-horizon, one-sided test told the direction and the effect in advance
needs to decide right with the goal's probability at level alpha, given the win share and decisive
rate the trials saw. A sequential test that met the goal within a budget would be such a test
(stop at the budget), so a floor above the budget says no test on these outcomes can meet it.
Progress goes to stderr; stdout gets the table and, last, exactly one JSON line. A figure that
was not measured is null.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from rich.console import Console
from rich.table import Table

from bench.live_models import (
    Catalog,
    Replay,
    Scored,
    copy_of,
    earlier_epoch,
    paired_bootstrap,
    relative_gap,
    replay_of,
    score,
    shuffled,
    train_champion,
    tune_noise,
)
from bench.live_trials import (
    Trial,
    ab_trial,
    floor_impressions,
    interleave_all,
    interleaved_trial,
)
from services.click_model import ClickModel
from training.evaluation import encode, load_table
from training.model import Recommender
from training.sequential import Decision, SequentialConfig

OUT = Console(width=160)
err = Console(stderr=True)


class LiveBenchConfig(BaseModel):
    """Everything one run of the benchmark needs."""

    model_config = ConfigDict(extra="forbid")

    quick: bool = Field(default=False, description="The ~3 minute version.")
    seed: int = Field(default=0, description="Seeds training, noise, subsampling and trials.")
    train_share: float = Field(default=0.8, gt=0, lt=1, description="Events the champion sees.")
    epochs: int = Field(default=20, ge=1, description="Champion training epochs.")
    requests: int | None = Field(
        default=None, ge=1, description="Replayed requests (seeded subsample); None = all."
    )
    trials: int = Field(default=500, ge=1, description="Trials per pair, each mode.")
    cap: int = Field(default=20_000, ge=1, description="Interleaved impressions per trial, most.")
    k: int = Field(default=10, ge=1, description="Positions per answer.")
    clicks: ClickModel = Field(default_factory=ClickModel, description="The click model.")
    test: SequentialConfig = Field(default_factory=SequentialConfig, description="The mSPRT.")
    subtle_gap: float = Field(
        default=0.075, gt=0, lt=1, description="NDCG@10 the subtly worse candidate loses."
    )
    better_gain: float = Field(
        default=0.10, gt=0, description="NDCG@10 the better candidate gains over its champion."
    )
    bootstrap: int = Field(default=2000, ge=100, description="Paired bootstrap resamples.")

    @classmethod
    def quick_preset(cls, **overrides: Any) -> LiveBenchConfig:
        base: dict[str, Any] = {"quick": True, "epochs": 8, "requests": 4000, "trials": 200}
        return cls(**{**base, **overrides})


@dataclass(frozen=True)
class Pair:
    """A pair to compare, the decision it should get, and the issue's budget for it."""

    name: str
    a: str
    b: str
    expect: Decision
    budget: int | None  # impressions (None: run to the cap, no decision wanted)
    share: float  # goal: this share of trials decided right within budget (same: at most)
    diff_range: tuple[float, float] | None  # the NDCG@10 b vs a for such a pair


SUBTLE_RANGE = (-0.10, -0.05)  # the "subtly worse": 5-10% lower NDCG@10
BETTER_RANGE = (0.0, 0.15)  # the "better": at most 15% higher
PAIRS = (
    Pair("clearly_worse", "champion", "shuffled", "b_worse", 2_000, 0.95, None),
    Pair("subtly_worse", "champion", "subtle", "b_worse", 10_000, 0.80, SUBTLE_RANGE),
    Pair("subtly_worse_epoch", "champion", "subtle_epoch", "b_worse", 10_000, 0.80, SUBTLE_RANGE),
    Pair("better", "weak", "champion", "b_better", 5_000, 0.90, BETTER_RANGE),
    Pair("better_epoch", "weak_epoch", "champion", "b_better", 5_000, 0.90, BETTER_RANGE),
    Pair("same", "champion", "copy", "continue", None, 0.05, (0.0, 0.0)),
)


def _gap(gain: float) -> float:
    """The NDCG@10 a weaker a loses against b when b is ``gain`` higher than a."""
    return 1.0 - 1.0 / (1.0 + gain)


def _log(msg: str, t0: float) -> None:
    err.print(f"[dim]{time.perf_counter() - t0:7.1f}s[/dim] {msg}")


def versions(
    cfg: LiveBenchConfig, replay: Replay, t0: float
) -> tuple[dict[str, Scored], dict[str, float]]:
    """Every version (``models``) scored on every request; and how each weaker version was
    made (noise scale, or epoch)."""
    models, catalog, knobs = build_models(cfg, replay, t0)
    scored = {name: score(catalog.scorer(m), replay, cfg.k) for name, m in models.items()}
    _log(f"{len(models)} versions ranked {len(replay.requests):,} requests", t0)
    return scored, knobs


def build_models(
    cfg: LiveBenchConfig, replay: Replay, t0: float
) -> tuple[dict[str, Recommender], Catalog, dict[str, float]]:
    """Train the champion and derive the other versions; the catalog they rank; and how each
    weaker version was made (noise scale, or epoch)."""
    model, catalog, earlier = train_champion(replay.inter, replay.cut, cfg.epochs, cfg.seed)
    _log(f"champion trained ({cfg.epochs} epochs on {replay.cut:,} events)", t0)

    def ndcg_of(m: Recommender) -> float:
        return score(catalog.scorer(m), replay, None).mean_ndcg

    base = ndcg_of(model)
    subtle = tune_noise(model, ndcg_of, cfg.subtle_gap, cfg.seed + 1)
    weak = tune_noise(model, ndcg_of, _gap(cfg.better_gain), cfg.seed + 2)
    gaps = [relative_gap(base, ndcg_of(m)) for m in earlier]
    ranges = {"subtle": (-SUBTLE_RANGE[1], -SUBTLE_RANGE[0]), "weak": (0.0, _gap(BETTER_RANGE[1]))}
    found = {
        "subtle_epoch": earlier_epoch(earlier, gaps, cfg.subtle_gap, ranges["subtle"]),
        "weak_epoch": earlier_epoch(earlier, gaps, _gap(cfg.better_gain), ranges["weak"]),
    }
    derived = {"subtle": subtle, "weak": weak} | {k: v for k, v in found.items() if v}
    _log(f"weaker versions: { {k: round(d.knob, 4) for k, d in derived.items()} }", t0)
    models = {"champion": model, "shuffled": shuffled(model, cfg.seed + 3), "copy": copy_of(model)}
    models |= {name: d.model for name, d in derived.items()}
    return models, catalog, {name: d.knob for name, d in derived.items()}


def _median(trials: list[Trial], cap: int) -> int | None:
    """Median impressions to a decision, undecided trials counted at the cap; None when the
    median trial did not decide (the median is then only known to exceed the cap)."""
    imps = sorted(t.impressions if t.decision != "continue" else cap + 1 for t in trials)
    med = float(np.median(imps))
    return None if med > cap else round(med)


def _summary(trials: list[Trial], pair: Pair, cap: int, budget: int | None) -> dict[str, Any]:
    n = len(trials)
    decided = [t for t in trials if t.decision != "continue"]
    right = [t for t in trials if t.decision == pair.expect]
    within = [t for t in right if budget is not None and t.impressions <= budget]
    simulated = sum(t.simulated for t in trials)
    wins, losses = sum(t.wins for t in trials), sum(t.losses for t in trials)
    return {
        "trials": n,
        "cap": cap,
        "decided_share": round(len(decided) / n, 4),
        "correct_share": round(len(right) / n, 4),
        "within_budget_share": round(len(within) / n, 4) if budget is not None else None,
        "wrong": sum(t.decision not in (pair.expect, "continue") for t in trials),
        "hit_cap": n - len(decided),
        "median_impressions": _median(trials, cap),
        "clicks_per_impression": round(sum(t.clicks for t in trials) / simulated, 4),
        # P(b wins | decisive) as the trials saw it: the effect size the test faced
        "b_win_share": round(wins / (wins + losses), 4) if wins + losses else None,
        "decisive_per_impression": round((wins + losses) / sum(t.impressions for t in trials), 4),
        "modal_decision": Counter(t.decision for t in trials).most_common(1)[0][0],
    }


def _agreeing(trials: list[Trial], direction: str) -> float | None:
    """Of the interleaved trials that decided, the share whose decision is the offline one."""
    decided = [t for t in trials if t.decision != "continue"]
    if not decided:
        return None
    return round(sum(t.decision == direction for t in decided) / len(decided), 4)


def run_pair(pair: Pair, i: int, scored: dict[str, Scored], replay: Replay,
             cfg: LiveBenchConfig, t0: float) -> dict[str, Any]:  # fmt: skip
    """One pair: offline NDCG and bootstrap, then interleaved trials, then A/B trials."""
    a, b = scored[pair.a], scored[pair.b]
    p = paired_bootstrap(a.ndcg, b.ndcg, replay.users, cfg.bootstrap, cfg.seed)
    diff = b.mean_ndcg / a.mean_ndcg - 1.0
    direction = "b_better" if diff > 0 else "b_worse" if diff < 0 else "continue"
    tables = interleave_all(a.top, b.top, replay.futures, cfg.clicks)

    def trials(mode: int, cap: int) -> list[Trial]:
        play = interleaved_trial if mode == 0 else ab_trial
        seeds = ([cfg.seed, i, t, mode] for t in range(cfg.trials))
        return [play(tables, cfg.clicks, cfg.test, cap, np.random.default_rng(s)) for s in seeds]

    il_trials = trials(0, cfg.cap)
    il = _summary(il_trials, pair, cfg.cap, pair.budget)
    il_figure = il["median_impressions"] or cfg.cap
    ab_cap = 10 * il_figure
    ab = _summary(trials(1, ab_cap), pair, ab_cap, None)  # the budgets are interleaving's
    _log(
        f"{pair.name}: interleaving {il['modal_decision']}, median {il['median_impressions']}; "
        f"A/B median {ab['median_impressions']}, {ab['hit_cap']} at cap {ab_cap:,}",
        t0,
    )
    ratio: float | None = None
    ratio_at_most: float | None = None
    if pair.expect != "continue" and il["median_impressions"] is not None:
        if ab["median_impressions"] is not None:
            ratio = round(il["median_impressions"] / ab["median_impressions"], 4)
        else:  # the A/B's median is past its cap: only a bound on the ratio is known
            ratio_at_most = round(il["median_impressions"] / ab_cap, 4)
    significant = p < 0.05
    in_range = None if pair.diff_range is None else pair.diff_range[0] <= diff <= pair.diff_range[1]
    return {
        "pair": pair.name, "a": pair.a, "b": pair.b, "expect": pair.expect,
        "budget": pair.budget, "goal_share": pair.share,
        "offline": {"ndcg10_a": round(a.mean_ndcg, 5), "ndcg10_b": round(b.mean_ndcg, 5),
                    "relative_diff": round(diff, 4), "p_value": round(p, 4),
                    "significant": significant, "direction": direction,
                    "in_issue_range": in_range},
        "interleaving": il, "ab": ab, "ratio": ratio, "ratio_at_most": ratio_at_most,
        "floor_impressions": None if pair.expect == "continue" else floor_impressions(
            il["b_win_share"], il["decisive_per_impression"], cfg.test.alpha, pair.share),
        "agrees": (il["modal_decision"] == direction) if significant else None,
        "decided_agreeing_share": _agreeing(il_trials, direction),
    }  # fmt: skip


def goals(results: list[dict[str, Any]]) -> dict[str, bool | None]:
    out: dict[str, bool | None] = {}
    for r in results:
        il, name = r["interleaving"], r["pair"]
        if r["offline"]["in_issue_range"] is not None:
            out[f"{name}_pair_offline_diff_in_issue_range"] = r["offline"]["in_issue_range"]
        if r["expect"] == "continue":
            out[f"{name}_decided_at_most_{r['goal_share']:.0%}_of_100+"] = (
                il["trials"] >= 100 and il["decided_share"] <= r["goal_share"]
            )
            continue
        out[f"{name}_within_{r['budget']}_in_{r['goal_share']:.0%}"] = (
            il["within_budget_share"] >= r["goal_share"]
        )
        bound = r["ratio"] if r["ratio"] is not None else r["ratio_at_most"]
        out[f"{name}_interleaving_at_most_fifth_of_ab"] = None if bound is None else bound <= 0.2
    judged = [r["agrees"] for r in results if r["agrees"] is not None]
    out["live_agrees_where_offline_significant"] = all(judged) if judged else None
    return out


def _fmt(x: Any) -> str:
    if x is None:
        return "null"
    if isinstance(x, bool):
        return "yes" if x else "no"
    return f"{x:,}" if isinstance(x, int) else str(x)


def print_tables(results: list[dict[str, Any]]) -> None:
    off = Table(title="Offline: next-slice NDCG@10, paired bootstrap over users")
    for c in ("pair", "a", "b", "NDCG@10 a", "NDCG@10 b", "b vs a", "p", "significant"):
        off.add_column(c, justify="left" if c in ("pair", "a", "b") else "right")
    for r in results:
        o = r["offline"]
        off.add_row(r["pair"], r["a"], r["b"], f"{o['ndcg10_a']:.4f}", f"{o['ndcg10_b']:.4f}",
                    f"{o['relative_diff']:+.1%}", f"{o['p_value']:.3f}",
                    _fmt(o["significant"]))  # fmt: skip
    OUT.print(off)
    live = Table(title="Live, replayed: impressions to a decision (IL = interleaving)")
    cols = ("pair", "budget", "IL right in budget", "IL median", "IL wrong", "IL undecided",
            "P(b wins)", "floor", "A/B cap", "A/B median", "A/B wrong", "A/B at cap", "IL / A/B",
            "agrees")  # fmt: skip
    for c in cols:
        live.add_column(c, justify="left" if c == "pair" else "right", no_wrap=c == "pair")
    for r in results:
        il, ab = r["interleaving"], r["ab"]
        ratio = _fmt(r["ratio"]) if r["ratio_at_most"] is None else f"<= {r['ratio_at_most']}"
        right = (f"decided {il['decided_share']:.0%}" if r["expect"] == "continue"
                 else f"{il['within_budget_share']:.0%}")  # fmt: skip
        cells = (il["median_impressions"], il["wrong"], il["hit_cap"], il["b_win_share"],
                 r["floor_impressions"], ab["cap"], ab["median_impressions"], ab["wrong"],
                 ab["hit_cap"])  # fmt: skip
        live.add_row(r["pair"], _fmt(r["budget"]), right, *map(_fmt, cells), ratio,
                     _fmt(r["agrees"]))  # fmt: skip
    OUT.print(live)


def run(cfg: LiveBenchConfig) -> dict[str, Any]:
    t0 = time.perf_counter()
    torch.manual_seed(cfg.seed)
    inter = encode(load_table())
    replay = replay_of(inter, cfg.train_share, cfg.requests, cfg.clicks.window, cfg.seed)
    _log(f"{len(replay.requests):,} requests replayed after event {replay.cut:,}", t0)
    scored, knobs = versions(cfg, replay, t0)
    built = [p for p in PAIRS if p.a in scored and p.b in scored]
    results = [run_pair(pair, i, scored, replay, cfg, t0) for i, pair in enumerate(built)]
    missing = [p.name for p in PAIRS if p not in built]
    return {"results": results, "knobs": knobs, "missing": missing,
            "requests": len(replay.requests),
            "users": len(np.unique(replay.users)), "cut": replay.cut,
            "seconds": round(time.perf_counter() - t0, 1)}  # fmt: skip


def report(cfg: LiveBenchConfig, res: dict[str, Any]) -> dict[str, Any]:
    OUT.print(f"click model (fixed before measuring): {cfg.clicks.describe()}")
    OUT.print(f"test: beta-mixture mSPRT, alpha {cfg.test.alpha}, prior sd {cfg.test.prior_sd}; "
              f"{cfg.trials} trials per pair and mode; interleaving cap {cfg.cap:,} impressions; "
              f"A/B cap 10x the interleaving median")  # fmt: skip
    OUT.print(f"replay: {res['requests']:,} requests of {res['users']} users after event "
              f"{res['cut']:,}; weaker versions (noise scale, epoch): {res['knobs']}")  # fmt: skip
    for name in res["missing"]:
        OUT.print(f"pair {name} not built: no earlier epoch's NDCG@10 falls in the issue's range")
    print_tables(res["results"])
    g = goals(res["results"]) | {f"{name}_pair_built": False for name in res["missing"]}
    for name, ok in g.items():
        OUT.print(f"goal {name}: {'met' if ok else 'not measured' if ok is None else 'NOT met'}")
    for r in res["results"]:
        if r["floor_impressions"] is not None and r["floor_impressions"] > r["budget"]:
            OUT.print(
                f"{r['pair']}: no level-{cfg.test.alpha} test on these outcomes decides it "
                f"right in {r['goal_share']:.0%} within {r['budget']:,} impressions (floor "
                f"{r['floor_impressions']:,}): the clicks carry too little of the gap"
            )
    OUT.print(f"total {res['seconds']} s")
    return {"bench": "live", "quick": cfg.quick, "click_model": cfg.clicks.model_dump(),
            "test": cfg.test.model_dump(), "trials": cfg.trials, "cap": cfg.cap,
            "requests": res["requests"], "weaker_versions": res["knobs"],
            "pairs_not_built": res["missing"],
            "pairs": res["results"], "goals": g, "seconds": res["seconds"]}  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.live", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="4,000 requests, 8 epochs, 200 trials")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--trials", type=int, help="trials per pair and mode")
    p.add_argument("--epochs", type=int, help="champion training epochs")
    p.add_argument("--requests", type=int, help="replayed requests (seeded subsample)")
    p.add_argument("--window", type=int, default=ClickModel().window,
                   help="click model: next N events")  # fmt: skip
    p.add_argument("--eta", type=float, default=ClickModel().eta,
                   help="click model: 1/(i+1)^eta bias")  # fmt: skip
    p.add_argument("--alpha", type=float, default=SequentialConfig().alpha)
    p.add_argument("--prior-sd", type=float, default=SequentialConfig().prior_sd,
                   help="the mSPRT's mixture sd (default: the product's)")  # fmt: skip
    a = p.parse_args(argv)
    over: dict[str, Any] = {
        "seed": a.seed,
        "clicks": ClickModel(window=a.window, eta=a.eta),
        "test": SequentialConfig(alpha=a.alpha, prior_sd=a.prior_sd),
    }
    for name in ("trials", "epochs", "requests"):
        if getattr(a, name) is not None:
            over[name] = getattr(a, name)
    cfg = LiveBenchConfig.quick_preset(**over) if a.quick else LiveBenchConfig(**over)
    print(json.dumps(report(cfg, run(cfg))), flush=True)


if __name__ == "__main__":
    main()
