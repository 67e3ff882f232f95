"""Typed configuration of the learning side: model, trainer, replay, gate."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from streams.config_base import StrictConfig
from streams.storage import Location, StorageConfig


class ModelConfig(StrictConfig):
    """A SASRec-style causal transformer over item-id sequences (GPT-2 blocks from transformers)."""

    max_len: int = Field(default=50, ge=2, le=4096, description="History items seen.")
    # A small model that sees the data more often learns more per CPU-second than a wider one
    # (docs/design.md, "Why the defaults").
    d_model: int = Field(default=32, ge=8, le=4096, description="Hidden size = item row size.")
    n_layers: int = Field(default=1, ge=1, le=48, description="Transformer blocks.")
    n_heads: int = Field(default=2, ge=1, le=64, description="Attention heads per block.")
    dropout: float = Field(default=0.2, ge=0.0, lt=1.0, description="Dropout everywhere.")
    loss: Literal["auto", "full", "sampled"] = Field(
        default="auto",
        description="Training loss: full softmax over the catalog, sampled softmax "
        "(num_negatives per target, log-Q corrected), or 'auto': sampled once the catalog has "
        "more than sampled_above rows, full below.",
    )
    sampled_above: int = Field(
        default=20_000,
        ge=2,
        description="With loss='auto', the catalog size (rows) above which the loss is sampled: "
        "a full softmax costs (targets per step) x (catalog) in time and memory.",
    )
    # 64 matched 256 on MovieLens-100K (NDCG@10 0.1042 +- 0.0107 against 0.1032 +- 0.0020, full
    # softmax 0.1024, 3 seeds) and a step reads a quarter of the rows: at 1M items, the rows a
    # step reads, exchanges and updates are most of its cost (docs/benchmarks.md, 2026-12-06).
    num_negatives: int = Field(
        default=64,
        ge=2,
        description="Negatives per target for the sampled softmax: half drawn from the "
        "step's own targets, half uniformly over the catalog.",
    )
    text_init: bool = Field(
        default=True,
        description="Initialise new items' rows from their title via MiniLM (offline, packaged); "
        "item_repr='id' only (the text modes place new items by their title features).",
    )
    item_repr: Literal["id", "text", "id+text"] = Field(
        default="id",
        description="What an item's row is: a learned ID row ('id'); a learned projection of "
        "its title's MiniLM features, kept with the version ('text'; items without a title "
        "share one row); or their sum ('id+text', new items start from their text).",
    )

    @model_validator(mode="after")
    def _heads_divide(self) -> ModelConfig:
        if self.d_model % self.n_heads:
            raise ValueError(
                f"d_model={self.d_model} must be divisible by n_heads={self.n_heads}; "
                "pick n_heads among its divisors"
            )
        return self


class ReplayConfig(StrictConfig):
    """The reservoir of past training sequences mixed into every round."""

    capacity: int = Field(default=20_000, ge=0, description="Sequences kept (0 disables replay).")
    ratio: float = Field(
        default=1.0,
        ge=0.0,
        le=16.0,
        description="Replayed sequences per new sequence in a round (capped by the reservoir).",
    )
    carry_max_examples: int = Field(
        default=50_000,
        ge=0,
        description=(
            "A rejected round's training examples are trained on again in the next round (with "
            "that round's own), until a round is promoted; past this many carried examples the "
            "oldest rejected rounds are let go and counted as never trained."
        ),
    )
    # Small warm rounds see each event once, with as many replayed sequences: they keep up with
    # the stream but learn less from it than a model trained for several epochs over it. Every
    # so often a round also replays a large sample of the reservoir for more epochs, gated like
    # any round, so the slow, broad learning happens too (README: consolidation rounds). Its
    # size and cadence trade stream NDCG@10 against the events a long round holds back
    # (docs/design.md, "Why the defaults").
    consolidate_every: int = Field(
        default=5,
        ge=0,
        description="Every this many rounds (rejected ones included), a consolidation round: "
        "the new events plus consolidate_examples replayed ones, consolidate_epochs passes. "
        "0 = never.",
    )
    consolidate_examples: int = Field(
        default=2_000,
        ge=0,
        description="Replayed sequences a consolidation round trains on (capped by the reservoir).",
    )
    consolidate_epochs: int = Field(
        default=1, ge=1, description="Passes over a consolidation round's data."
    )
    kd_weight: float = Field(
        default=0.0, ge=0.0, le=10.0, description="Distillation loss weight from the champion."
    )
    kd_temperature: float = Field(default=2.0, gt=0.0, description="Distillation temperature.")
    seed: int = Field(default=0, description="Seed of the reservoir's sampling.")


class TrainerConfig(StrictConfig):
    """One training round: Ray Train workers running DeepSpeed data parallelism."""

    num_workers: int = Field(default=2, ge=1, description="Ray Train workers (data parallel).")
    use_gpu: bool | None = Field(
        default=None, description="Train on GPUs; None = when the Ray cluster has any."
    )
    cpus_per_worker: float = Field(default=1.0, gt=0, description="CPUs reserved per worker.")
    nice: int = Field(
        default=19,
        ge=0,
        le=19,
        description="Niceness added to each training worker process (the OS caps the sum at "
        "19), so that on nodes that also serve or ingest, training yields the CPU to them: "
        "rounds are batch work, a request or an event on its way to the live histories is not. "
        "0 = as Ray starts them.",
    )
    zero_stage: Literal[0, 1, 2, 3] = Field(default=2, description="DeepSpeed ZeRO stage.")
    # Rounds are small and continuous: each new event is trained on once, in the round after it
    # arrived, with as many replayed sequences against forgetting (a stream's own recipe).
    epochs: int = Field(default=1, ge=1, description="Passes over a warm round's data.")
    first_round_epochs: int = Field(
        default=10,
        ge=1,
        description="Passes with no champion to warm-start from (a cold model needs more).",
    )
    # 2 workers x 16 at 5e-3 is bench.quality's offline recipe (32 at 5e-3), for warm-started
    # rounds as for a first version (docs/design.md, "Why the defaults").
    batch_size: int = Field(
        default=16, ge=1, description="Sequences per worker per step (global: x num_workers)."
    )
    lr: float = Field(default=5e-3, gt=0, description="AdamW peak learning rate.")
    lr_schedule: Literal["constant", "cosine"] = Field(
        default="constant",
        description="After warm-up: hold the peak rate, or decay it to 0 over the round (cosine).",
    )
    # A round of ~100 new events is a handful of steps, and a fresh AdamW's first steps are ~lr
    # each whatever the gradient: without a warm-up the gate rejected 4-21 rounds per run of
    # bench.freshness --quick (streaks up to 7), with half an epoch 2-4 (none longer than 2);
    # bench.quality's stream NDCG@10 was unchanged (0.0965 against 0.0961). docs/benchmarks.md.
    warmup_epochs: float = Field(
        default=0.5,
        ge=0.0,
        description="Linear warm-up from 0 to the peak rate over this many epochs of the round "
        "(every round starts a fresh optimizer on the champion's weights).",
    )
    weight_decay: float = Field(default=0.0, ge=0, description="AdamW weight decay.")
    row_wise_table: bool = Field(
        default=True,
        description="With the sampled loss over ID rows (large catalogs), train the item table "
        "row by row: lazy Adam over the rows a step read, exchanged between workers as sparse "
        "rows, instead of the whole table's gradient every step. CPU runs without distillation "
        "only; elsewhere, or False, the table is trained with the dense parameters.",
    )
    max_failures: int = Field(
        default=2, ge=0, description="Retries of a round when a worker dies (Ray FailureConfig)."
    )
    # Ray Train's controller acts on its workers only when it polls them: a run's start, each
    # report and a run's end wait for the next poll (Ray's default: every 2 s).
    poll_s: float = Field(
        default=0.5,
        gt=0,
        le=10,
        description="How often Ray Train's controller polls the training workers (Ray's "
        "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S, set from here for every run streamtune starts). A "
        "run's start, each report and its end wait for a poll: a run of its own per round "
        "ends ~4 s sooner at 0.5 than at Ray's 2.0, for ~1% of a core while a run is up.",
    )
    # With polls every 2 s, a report waits while the one before it is still queued: a
    # checkpoint per small round held each round ~2 s.
    checkpoint_every_s: float = Field(
        default=2.0,
        ge=0.0,
        description=(
            "A long-lived run checkpoints at the end of a round's epoch (not its last: the round's "
            "result follows at once) once it has trained this many seconds since its last "
            "checkpoint; a round shorter than that is trained again from its start if a worker "
            "dies. 0 = after every epoch but a round's last. (A run per round checkpoints every "
            "epoch: its result is its last checkpoint.)"
        ),
    )
    storage_path: Location = Field(
        default=Path("state/ray_results"),
        description=(
            "Ray Train's checkpoints: a local path on one machine, an s3:// (gs://, ...) URI on a "
            "multi-node cluster (every node must reach it)."
        ),
    )
    storage: StorageConfig = Field(
        default_factory=StorageConfig,
        description="Object-store options when storage_path is a URI.",
    )
    seed: int = Field(default=0, description="Seed for shuffling and initialisation.")
    node_resource: str | None = Field(
        default=None,
        description=(
            "Custom Ray resource that marks training nodes (e.g. 'streamtune_train' given by "
            "`ray start --resources`); the round's task, its workers and a recipe search's "
            "trials go only there. None: any."
        ),
    )

    def on_training_nodes(self, share: float = 0.001) -> dict[str, float]:
        """Ray resources that place a task, actor or trial on the training nodes: a ``share`` of
        their marker (``node_resource``); none when no marker is set."""
        return {self.node_resource: share} if self.node_resource else {}


class RegistryConfig(StrictConfig):
    """Where versions, the champion pointer and the rollout state live."""

    path: Location = Field(
        default=Path("state/registry"),
        description="Local directory or s3://, gs://, az:// URI (shared by every node).",
    )
    storage: StorageConfig = Field(
        default_factory=StorageConfig, description="Object-store options when path is a URI."
    )


class GateConfig(StrictConfig):
    """When a candidate may replace the champion."""

    tolerance: float = Field(
        default=0.005, ge=0.0, description="Allowed NDCG@10 drop against the champion."
    )
    confidence_z: float = Field(
        default=1.64,
        ge=0.0,
        description="Reject only a drop past the tolerance by this many standard errors (0 = off).",
    )
    min_eval_users: int = Field(
        default=20, ge=1, description="Fewer held-out users than this: reject as unmeasurable."
    )
    # With one question per user, NDCG@10 on a round's own events rests on a handful of hits:
    # its standard error was as large as a round's effect, and good rounds were rejected.
    holdout_events: int = Field(
        default=3,
        ge=1,
        le=50,
        description=(
            "The gate's questions: each new user's last N new events are held out (not trained "
            "on), but never more than half of a user's new events; more questions, less noise."
        ),
    )
    replay_eval_size: int = Field(
        default=500, ge=0, description="Replay sequences held out to measure forgetting."
    )
    # A small round brings few users with a held-out event; without this top-up a round would
    # wait for enough of them, far longer than it takes to train.
    recent_questions: int = Field(
        default=300,
        ge=0,
        description=(
            "Held-out questions of earlier rounds kept with each version; a round with fewer "
            "than min_eval_users users of its own is topped up from the newest of them (users "
            "with no event in the round only, see training/questions.py). 0 = every round "
            "must bring min_eval_users users itself."
        ),
    )
    keep_versions: int = Field(default=10, ge=2, description="Versions kept in the registry.")


class TuneConfig(StrictConfig):
    """The recipe search of a lineage's first version (``training.tune``, Ray Tune + ASHA)."""

    # Off by default: on MovieLens-100K the search has not beaten the fixed recipe on test
    # NDCG@10 (docs/design-tune.md, "Measured so far"), and it holds the first version back.
    first_version: bool = Field(
        default=False,
        description="Search the recipe of a lineage's first version on that round's own training "
        "events before training it (architecture, lr, batch, epochs); later rounds inherit it. "
        "Costs the search's budget (about 3x one training of the fixed recipe) before the first "
        "version exists. Off by default: on MovieLens-100K the search has not beaten the fixed "
        "recipe on test NDCG@10 (0.0976 vs 0.1067, docs/design-tune.md).",
    )
    budget_cpu_minutes: float | None = Field(
        default=None,
        gt=0,
        description="CPU minutes the whole search may take, summed over its trials' processes "
        "(the same work on a loaded machine as on an idle one); None = budget_trainings "
        "trainings of the fixed recipe on the data, within the min and max below.",
    )
    # Scaled by what a training costs on the data, not by its events alone: an epoch over a
    # 16k-item catalog costs ~10x one over MovieLens-100K's 1.7k items per event, and a budget
    # per event gave such a search a quarter of one training (docs/design-tune.md).
    budget_trainings: float = Field(
        default=3.0,
        gt=0,
        description="The default budget, in trainings of the fixed recipe: max_epochs epochs each, "
        "an epoch's CPU time (validation included) measured on a sample of the data at one "
        "thread before the search starts.",
    )
    min_budget_cpu_minutes: float = Field(
        default=1.0, gt=0, description="The default budget never goes below this."
    )
    max_budget_cpu_minutes: float = Field(
        default=60.0, gt=0, description="The default budget never goes above this."
    )
    cpus: int = Field(
        default=2, ge=1, description="Trials run side by side, one CPU (one torch thread) each."
    )
    max_trials: int = Field(
        default=24, ge=1, description="Recipes sampled at most (the budget usually ends first)."
    )
    max_epochs: int = Field(default=40, ge=1, description="Epochs a trial may train at most.")
    patience: int = Field(
        default=6,
        ge=1,
        description="A trial stops after this many epochs without a better validation NDCG@10.",
    )
    grace_epochs: int = Field(
        default=4, ge=1, description="ASHA: epochs every trial trains before it can be cut."
    )
    reduction_factor: float = Field(
        default=3.0, gt=1.0, description="ASHA: 1 in this many trials goes on at each rung."
    )
    wall_factor: float = Field(
        default=3.0,
        ge=1.0,
        description="The search also ends after this many times its CPU budget's wall time "
        "(budget / cpus): on a machine busy with other work it gets its CPU time, but not "
        "forever.",
    )
    seed: int = Field(default=0, description="Seeds the sampled recipes and every trial's init.")
    storage_path: Path = Field(
        default=Path("state/tune"),
        description="Ray Tune's trial results and the winner's weights (a local folder).",
    )

    def budget_cpu_s(self, epoch_cpu_s: float | None) -> float:
        """CPU seconds of the search (all trials together), where one epoch of the fixed recipe
        costs ``epoch_cpu_s`` (needed unless ``budget_cpu_minutes`` is set)."""
        minutes = self.budget_cpu_minutes
        if minutes is None:
            if epoch_cpu_s is None:
                raise ValueError("the default budget needs the cost of an epoch on the data")
            scaled = self.budget_trainings * self.max_epochs * epoch_cpu_s / 60.0
            minutes = min(self.max_budget_cpu_minutes, max(self.min_budget_cpu_minutes, scaled))
        return 60.0 * minutes

    def wall_limit_s(self, budget_cpu_s: float) -> float:
        """Wall-clock seconds after which a search of ``budget_cpu_s`` ends whatever CPU time it
        has used."""
        return self.wall_factor * budget_cpu_s / self.cpus
