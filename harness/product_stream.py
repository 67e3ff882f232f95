"""The ``product`` streaming strategy: the product's own rounds, defaults and gate included.

Where the other strategies of ``bench.quality`` train in process (``training.fit``), this one runs
exactly what the continual loop runs: ``training.round.run_round`` with the ``RoundConfig`` of the
product's default settings (``services.runtime.round_config(load_settings(...))``; only where
state lives differs: a temporary registry and Ray Train storage), a real ``Registry`` and the
loop's default long-lived trainer (``training.session.TrainingSession``: one Ray Train +
DeepSpeed run kept up across rounds, on a local Ray of 2 CPUs).

The stream is the benchmark's trainable events (chunk holdouts are never delivered, as the other
strategies never train on them) as buffer rows of one partition ``events:0`` whose offset is the
row index in the dataset. Chunk 0 is the first version: one fresh round (no champion, empty
context, ``trainer.first_round_epochs``) instead of the shared pretrained model. Every later chunk
is cut, in time order, into rounds of about ``ProductStream.round_events`` events (the size a
~100 events/s stream gives the continuous loop), each run as the loop runs it
(``services.loop.ContinualLoop.run_once``): ``after_watermark`` = the latest version's watermark,
context from the versions' history index, a rejected round's examples carried into the next round
(``training.carry``), and a round refused as too small or empty (``RoundTooSmallError``,
``EmptyRoundError``) leaves its events pending, so the next round covers them too. While there is
no champion, a round is a fresh start over everything delivered so far, as in the loop.

After each chunk the registry's champion is scored with the same ``ModelScorer`` as the others.
Benchmark-only: production never imports this module.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field

from harness.prequential import Chunk, StrategyResult, run_stream
from services.runtime import round_config
from services.settings import load_settings
from streams.offsets import tp_key
from training.errors import EmptyRoundError, RoundTooSmallError
from training.evaluation import Interactions, ModelScorer, Scorer
from training.registry import Registry
from training.round import RoundConfig, RoundResult, TrainFn, run_round
from training.session import TrainingSession

TOPIC, PARTITION = "events", 0
KEY = tp_key(TOPIC, PARTITION)


class ProductStream(BaseModel):
    """How the benchmark feeds the product's rounds (a workload knob, not a product setting)."""

    model_config = ConfigDict(extra="forbid")

    round_events: int = Field(
        default=300,
        ge=1,
        description="Events per round after chunk 0: what a ~100 events/s stream gives the "
        "continuous loop (a round every ~3 s).",
    )


@dataclass
class ChunkCounts:
    """What the product's rounds did over one chunk."""

    chunk: int
    events: int = 0  # delivered in this chunk
    rounds: int = 0  # registered
    promoted: int = 0
    rejected: int = 0
    refused: int = 0  # too small or empty: nothing registered, the events waited
    carried_events: int = 0  # earlier rejected rounds' events trained on again
    never_trained: int = 0  # events of spans the bounded carry let go
    seconds: float = 0.0


def product_table(inter: Interactions) -> pa.Table:
    """``inter.table`` as one buffer partition: topic ``events``, partition 0, offset = row."""
    t = inter.table
    n = t.num_rows
    t = t.set_column(t.schema.get_field_index("topic"), "topic", pa.array([TOPIC] * n))
    part = pa.array(np.full(n, PARTITION, dtype=np.int32))
    t = t.set_column(t.schema.get_field_index("partition"), "partition", part)
    return t.set_column(t.schema.get_field_index("offset"), "offset", pa.array(np.arange(n)))


def round_slices(rows: np.ndarray, round_events: int) -> list[np.ndarray]:
    """``rows`` (time order) cut into ceil(n / round_events) nearly equal consecutive rounds."""
    if len(rows) == 0:
        return []
    return np.array_split(rows, -(-len(rows) // round_events))


class _NoChampion:
    """What answers before any version is promoted: nothing (every target a miss)."""

    def __init__(self, n_items: int) -> None:
        self.n_items = n_items

    def score(self, histories: Sequence[np.ndarray]) -> np.ndarray:
        return np.full((len(histories), self.n_items + 1), -np.inf, dtype=np.float32)


class ProductStrategy:
    """The product's loop over the benchmark's stream (see the module docstring)."""

    name = "product"

    def __init__(
        self,
        inter: Interactions,
        cfg: ProductStream,
        registry: Registry,
        round_cfg: RoundConfig,
        trainer: TrainFn,
        on_round: Callable[[RoundResult | None, str], None] | None = None,
    ) -> None:
        """``trainer``: what trains each round (the product's: a ``TrainingSession``'s
        ``train``, as ``product_strategy`` passes)."""
        self.inter, self.cfg, self.registry, self.round_cfg = inter, cfg, registry, round_cfg
        self.trainer, self.on_round = trainer, on_round
        self.table = product_table(inter)
        self.delivered = np.zeros(0, dtype=np.int64)  # every row delivered so far, in order
        self.pending = np.zeros(0, dtype=np.int64)  # delivered, not yet in a registered round
        self.counts: list[ChunkCounts] = []
        self.first_round_s = 0.0
        self._scorer: tuple[int, Scorer] | None = None

    # -- the Strategy protocol (harness.prequential) ----------------------------------------
    def start(self, chunk0: Chunk) -> None:
        """The first version: one fresh round over chunk 0's trainable events."""
        t0 = time.perf_counter()
        self._deliver(chunk0.index, [chunk0.train_rows])
        self.first_round_s = time.perf_counter() - t0

    def update(
        self, rows: np.ndarray, seen_rows: np.ndarray, catalog_rows: np.ndarray | None = None
    ) -> None:
        """Rounds of ``round_events`` over ``rows``; the product keeps its own history and
        catalog (its versions' index), so ``seen_rows`` and ``catalog_rows`` are not used."""
        self._deliver(len(self.counts), round_slices(rows, self.cfg.round_events))

    def scorer(self) -> Scorer:
        champ = self.registry.champion()
        if champ is None:
            return _NoChampion(self.inter.n_items)
        if self._scorer is None or self._scorer[0] != champ:
            v = self.registry.load(champ)
            self._scorer = (champ, ModelScorer(v.model, v.vocab, self.inter.item_ids))
        return self._scorer[1]

    # -- rounds -------------------------------------------------------------------------
    def _deliver(self, chunk: int, slices: list[np.ndarray]) -> None:
        counts = ChunkCounts(chunk)
        t0 = time.perf_counter()
        for part in slices:
            self.delivered = np.concatenate([self.delivered, part])
            self.pending = np.concatenate([self.pending, part])
            counts.events += len(part)
            self._round(counts)
        counts.seconds = time.perf_counter() - t0
        self.counts.append(counts)

    def _round(self, counts: ChunkCounts) -> None:
        """One round over the pending events, as ``ContinualLoop.run_once`` runs it."""
        base = self.registry.latest()
        fresh = self.registry.champion() is None
        after: dict[str, int] = {}
        if not fresh and base is not None:
            after = dict(self.registry.meta(base)["watermark"])
        rows = self.delivered if fresh else self.pending  # a fresh start learns from everything
        new = self.table.take(pa.array(rows))
        context = new.slice(0, 0) if fresh else None  # else: the versions' history index
        watermark = {KEY: int(rows[-1]) + 1}
        try:
            result = run_round(
                new,
                context,
                watermark,
                self.registry,
                self.round_cfg,
                extra_meta={"after_watermark": after},
                trainer=self.trainer,
            )
        except (EmptyRoundError, RoundTooSmallError) as err:
            counts.refused += 1  # nothing registered: these events wait for the next round
            if self.on_round is not None:
                self.on_round(None, str(err))
            return
        self.pending = np.zeros(0, dtype=np.int64)
        counts.rounds += 1
        counts.promoted += int(result.promoted)
        counts.rejected += int(not result.promoted)
        counts.carried_events += result.carried_events
        counts.never_trained += sum(int(s.get("events", 0)) for s in result.dropped)
        if self.on_round is not None:
            self.on_round(result, result.reason)

    # -- report -------------------------------------------------------------------------
    def report(self) -> dict[str, object]:
        """Totals over the streamed chunks (1..F), the first round, and per-chunk counts."""
        streamed = self.counts[1:]
        keys = ("rounds", "promoted", "rejected", "refused", "carried_events", "never_trained")
        totals = {k: sum(getattr(c, k) for c in streamed) for k in keys}
        first = self.counts[0] if self.counts else ChunkCounts(0)
        return {
            **totals,
            "pending_events_at_end": len(self.pending),
            "round_events": self.cfg.round_events,
            "first_round": {
                "promoted": first.promoted == 1,
                "seconds": round(first.seconds, 1),
                "events": first.events,
            },
            "per_chunk": [{**asdict(c), "seconds": round(c.seconds, 1)} for c in self.counts],
            "round_config": self.round_cfg.model_dump(
                mode="json", exclude={"trainer": {"storage_path"}}
            ),
        }


@contextmanager
def product_strategy(
    inter: Interactions,
    cfg: ProductStream,
    on_round: Callable[[RoundResult | None, str], None] | None = None,
) -> Iterator[ProductStrategy]:
    """A ``ProductStrategy`` on the product's default settings, in a temporary state directory
    (registry, Ray Train storage), with a local Ray of 2 CPUs if none is up; closed after."""
    import ray

    root = Path(tempfile.mkdtemp(prefix="quality-product-"))
    settings = load_settings(state_dir=root)  # the product's defaults; only paths differ
    started_ray = not ray.is_initialized()
    if started_ray:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    session = TrainingSession()
    try:
        registry, round_cfg = settings.open_registry(), round_config(settings)
        yield ProductStrategy(inter, cfg, registry, round_cfg, session.train, on_round)
    finally:
        session.close()
        if started_ray:
            ray.shutdown()
        shutil.rmtree(root, ignore_errors=True)


def run_product(
    inter: Interactions,
    chunks: Sequence[Chunk],
    cfg: ProductStream,
    on_chunk: Callable[[int, StrategyResult], None],
    log: Callable[[str], None],
) -> tuple[StrategyResult, dict[str, object]]:
    """The product strategy test-then-train over ``chunks``; its result and its rounds' report.
    ``log`` gets the first version, every refused or rejected round and every 25th round."""
    n = 0

    def on_round(result: RoundResult | None, why: str) -> None:
        nonlocal n
        n += 1
        if result is None:
            log(f"product round {n}: not registered, its events wait: {why}")
        elif not result.promoted or n % 25 == 0 or n == 1:
            decision = "promoted" if result.promoted else "rejected"
            log(
                f"product round {n}: v{result.version} {decision} ({result.new_events} events, "
                f"carried {result.carried_events}, train {result.train_s:.1f}s): {why}"
            )

    with product_strategy(inter, cfg, on_round) as strategy:
        strategy.start(chunks[0])
        log(
            f"product: first version on chunk 0 ({len(chunks[0].train_rows)} events) in "
            f"{strategy.first_round_s:.1f}s"
        )
        [res] = run_stream(chunks, [strategy], on_chunk)
        return res, strategy.report()


def product_goal(
    product: StrategyResult, full: StrategyResult, report: dict[str, object]
) -> tuple[float, str]:
    """Product over full_retrain mean stream NDCG@10, and the console line that says it."""
    ratio = product.mean_stream_ndcg10 / full.mean_stream_ndcg10
    line = (
        f"product / full_retrain: stream NDCG@10 {product.mean_stream_ndcg10:.4f} / "
        f"{full.mean_stream_ndcg10:.4f} = {ratio:.1%} (goal >= 98%); product rounds "
        f"{report['rounds']} (promoted {report['promoted']}, rejected {report['rejected']}, "
        f"refused {report['refused']}), carried events {report['carried_events']}, never "
        f"trained {report['never_trained']}, train {sum(product.train_s):.0f}s vs "
        f"{sum(full.train_s):.0f}s"
    )
    return ratio, line
