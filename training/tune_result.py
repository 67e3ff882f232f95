"""The recipe search's results: the table of trials (``TrialRow``), the winner (``SearchResult``),
the CPU budget that ends a search (``CpuBudget``) and the table as printed (``search_table``)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ray.tune.stopper import Stopper

from training.config import ModelConfig, TrainerConfig
from training.tune_space import Recipe

METRIC = "best_valid_ndcg10"  # ASHA compares the best so far: one noisy epoch cuts no trial


class CpuBudget(Stopper):
    """Ends the search once its trials' processes have used ``budget_s`` CPU seconds together
    (each trial reports its own as ``cpu_s``); a Ray Tune stopper, run by the driver."""

    def __init__(self, budget_s: float) -> None:
        self.budget_s = budget_s
        self.used: dict[str, float] = {}

    def __call__(self, trial_id: str, result: dict[str, Any]) -> bool:
        self.used[trial_id] = float(result.get("cpu_s", 0.0))
        return False

    def stop_all(self) -> bool:
        return sum(self.used.values()) >= self.budget_s


@dataclass(frozen=True)
class TrialRow:
    """One trial of the search's table (null metrics: it never finished an epoch)."""

    trial_id: str
    recipe: dict[str, Any]
    best_valid_ndcg10: float | None
    best_epoch: int | None
    epochs: int
    seconds: float
    cpu_s: float
    checkpoint: str | None = None


@dataclass(frozen=True)
class SearchResult:
    best: TrialRow
    model: ModelConfig
    trainer: TrainerConfig
    trials: list[TrialRow]
    budget_cpu_s: float
    seconds: float
    path: Path
    unstarted: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "best": asdict(self.best),
            "model": self.model.model_dump(mode="json"),
            "trainer": self.trainer.model_dump(mode="json"),
            "trials": [asdict(t) for t in self.trials],
            "budget_cpu_s": round(self.budget_cpu_s, 1),
            "cpu_s": round(self.cpu_s, 1),
            "seconds": round(self.seconds, 1),
            "unstarted_trials": self.unstarted,
        }

    @property
    def cpu_s(self) -> float:
        """CPU seconds the trials used (the last report of each; less than they ran)."""
        return sum(t.cpu_s for t in self.trials)

    def save(self) -> Path:
        out = self.path / "search.json"
        out.write_text(json.dumps(self.to_json(), indent=2))
        return out


def trial_row(res: Any) -> TrialRow:
    metrics = res.metrics or {}
    frame = res.metrics_dataframe
    scored = frame is not None and "valid_ndcg10" in frame
    best = float(frame[METRIC].max()) if scored else None
    best_epoch = int(frame["best_epoch"].iloc[-1]) if scored else None
    keys = set(Recipe.model_fields)
    return TrialRow(
        trial_id=str(metrics.get("trial_id", Path(res.path).name)),
        recipe={k: v for k, v in res.config.items() if k in keys},
        best_valid_ndcg10=best,
        best_epoch=best_epoch,
        epochs=int(metrics.get("training_iteration", 0)),
        seconds=round(float(metrics.get("time_total_s", 0.0)), 1),
        cpu_s=round(float(metrics.get("cpu_s", 0.0)), 1),
        checkpoint=res.checkpoint.path if res.checkpoint is not None else None,
    )


def search_table(result: SearchResult) -> Any:
    """The trials as a rich Table, best validation NDCG@10 first."""
    from rich.table import Table

    table = Table(title=f"Recipe search: {len(result.trials)} trials in {result.seconds:.0f} s, "
                  f"{result.cpu_s:.0f} CPU s (budget {result.budget_cpu_s:.0f})")  # fmt: skip
    cols = ("trial", "width", "blocks", "heads", "dropout", "lr", "batch", "negatives",
            "valid NDCG@10", "best epoch", "epochs", "s", "CPU s")  # fmt: skip
    for col in cols:
        table.add_column(col, justify="right")
    order = sorted(result.trials, key=lambda r: -(r.best_valid_ndcg10 or -1.0))
    for r in order:
        p = r.recipe
        ndcg = "" if r.best_valid_ndcg10 is None else f"{r.best_valid_ndcg10:.4f}"
        mark = " *" if r.trial_id == result.best.trial_id else ""
        table.add_row(f"{r.trial_id}{mark}", str(p.get("d_model")), str(p.get("n_layers")),
                      str(p.get("n_heads")), f"{p.get('dropout', 0):.2f}", f"{p.get('lr', 0):.2e}",
                      str(p.get("batch_size")), str(p.get("num_negatives", "")), ndcg,
                      str(r.best_epoch or ""), str(r.epochs), f"{r.seconds:.1f}",
                      f"{r.cpu_s:.1f}")  # fmt: skip
    return table
