"""One training round: new events + replay -> Ray Train (DeepSpeed) -> gate -> registry.

    result = run_round(new, context, watermark, registry, RoundConfig())

``new`` holds the events since the last round, ``context`` the same users' earlier events (their
history, not trained on again), ``watermark`` the buffer offsets that ``new`` ends at; all are
plain Arrow tables and dicts: this module knows nothing of Kafka. The round warm-starts from the
champion, grows the item table for new items (text-initialised when titles are known), trains
with N Ray Train workers (ScalingConfig: CPU + gloo here; GPUs + NCCL + bf16 on a GPU cluster,
by config only), evaluates the candidate against the champion, and registers it with the decision
in one step (``Registry.register(..., promote=, reason=, expect_latest=)``): if another round
registered since this one read its lineage, ``ConcurrentRoundError`` is raised and nothing is kept.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pyarrow as pa
import torch
from pydantic import BaseModel, ConfigDict, Field

from streams.storage import arrow_filesystem
from training import lineage
from training.carry import Carry
from training.config import GateConfig, ModelConfig, ReplayConfig, TrainerConfig
from training.data import (
    Examples,
    holdout_as_examples,
    holdout_from_examples,
    round_examples,
    user_sequences,
)
from training.errors import (
    EmptyRoundError,
    LineageError,
    NonFiniteWeightsError,
    RoundFailedError,
    RoundTooSmallError,
)
from training.gate import gate, question_ranks
from training.histories import UserHistories
from training.model import Recommender, save_weights
from training.questions import user_keys
from training.registry import LoadedVersion, Registry
from training.textinit import init_rows, text_rows
from training.textinit import warm as warm_titles
from training.vocab import ItemVocab
from training.worker import train_loop_per_worker


class RoundConfig(BaseModel):
    """Everything a round needs besides its data."""

    model_config = ConfigDict(extra="forbid")

    model: ModelConfig = Field(default_factory=ModelConfig, description="Model architecture.")
    trainer: TrainerConfig = Field(
        default_factory=TrainerConfig, description="Ray Train/DeepSpeed."
    )
    replay: ReplayConfig = Field(default_factory=ReplayConfig, description="Replay and KD.")
    gate: GateConfig = Field(default_factory=GateConfig, description="Promotion gate.")


@dataclass
class RoundResult:
    version: int
    promoted: bool
    reason: str
    watermark: dict[str, int]
    metrics: dict[str, float] = field(default_factory=dict)
    new_events: int = 0
    items_added: int = 0
    train_s: float = 0.0
    # Offset spans this version first trained on (its own slice and the rejected rounds' it
    # carried; none if rejected), and spans the bounded carry let go (never trained on).
    trained: list[dict[str, Any]] = field(default_factory=list)
    dropped: list[dict[str, Any]] = field(default_factory=list)
    carried_events: int = 0
    # "first" (no champion to start from), "incremental", or "consolidation" (a large replay
    # sample for more epochs, every replay.consolidate_every rounds).
    kind: str = "incremental"
    # Seconds of each part of the round here: prepare (item map, context, examples), train,
    # gate, register. (The loop adds what happens around it: trigger wait, data read.)
    phases: dict[str, float] = field(default_factory=dict)


def _titles(table: pa.Table) -> dict[str, str]:
    out: dict[str, str] = {}
    for item, text in zip(
        table.column("item_id").to_pylist(), table.column("item_text").to_pylist(), strict=True
    ):
        if text:
            out[item] = text
    return out


def _ts_quantiles(table: pa.Table) -> list[int]:
    """21 event-time quantiles (ms) of a round's events, for freshness once it serves."""
    if table.num_rows == 0:
        return []
    ts = table.column("ts").to_numpy()
    return [int(x) for x in np.quantile(ts, np.linspace(0, 1, 21), method="nearest")]


def _popularity(before: list[int], vocab: ItemVocab, new: pa.Table) -> list[int]:
    """Cumulative interaction counts per row (serving's fallback for users with no history)."""
    counts = before + [0] * (len(vocab) - len(before))
    for row in vocab.encode(new.column("item_id").to_pylist()):
        counts[row] += 1
    return counts


def _lineage_settings(cfg: RoundConfig) -> str:
    """The settings that shape the state a round reads (its reservoirs' and questions' sizes)."""
    return json.dumps([cfg.model.max_len, cfg.replay.model_dump(), cfg.gate.model_dump()])


def prepare_model(
    champion: Recommender | None,
    vocab: ItemVocab,
    cfg: ModelConfig,
    titles: dict[str, str],
    new_items: list[str],
) -> Recommender:
    """The round's starting point: the champion grown to the new catalog, or a fresh model.

    In the text item representations the rows' title features (zeros without a title) are
    embedded here, once per item: they travel in the version's weights from then on.
    """
    if champion is None:
        texts = [None, *(titles.get(i) for i in vocab.items())]  # row 0 = padding
        return Recommender(cfg, len(vocab), text_rows(texts) if cfg.item_repr != "id" else None)
    model = Recommender.from_state(champion.cfg, champion.state_dict())
    if model.cfg.item_repr != "id":  # titles place new items; id+text's ID rows start at zero
        model.grow(len(vocab), text=text_rows([titles.get(i) for i in new_items]))
        return model
    init = None
    if cfg.text_init and new_items and all(i in titles for i in new_items):
        known = [i for i in vocab.items()[: champion.n_rows - 1] if i in titles]
        rows = torch.tensor([vocab.index(i) for i in known], dtype=torch.long)
        init = init_rows(
            model.item_embeddings()[rows],
            [titles[i] for i in known],
            [titles[i] for i in new_items],
        )
    model.grow(len(vocab), init)
    return model


def worker_resources(tcfg: TrainerConfig, use_gpu: bool) -> dict[str, float] | None:
    """What one Ray Train worker reserves: CPUs (GPU via use_gpu), and a sliver of the training
    nodes' marker resource so workers are placed on those nodes only."""
    res: dict[str, float] = {} if use_gpu else {"CPU": tcfg.cpus_per_worker}
    if tcfg.node_resource:
        res[tcfg.node_resource] = 0.01
    return res or None


def _use_gpu(cfg: RoundConfig) -> bool:
    import ray

    if cfg.trainer.use_gpu is not None:
        return cfg.trainer.use_gpu
    return bool(ray.cluster_resources().get("GPU", 0) >= cfg.trainer.num_workers)


def round_job(
    init: Recommender,
    teacher: Recommender | None,
    examples: Examples,
    cfg: RoundConfig,
    cold: bool,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """A round for the workers: its data (for the object store) and its settings."""

    use_gpu = _use_gpu(cfg)
    data = {
        "inputs": examples.inputs,
        "targets": examples.targets,
        "init_state": init.state_numpy(),
        "teacher_state": teacher.state_numpy() if teacher and cfg.replay.kd_weight > 0 else None,
    }
    tcfg = cfg.trainer.model_dump(mode="json")
    if cold:
        tcfg["epochs"] = cfg.trainer.first_round_epochs
    return data, {
        "model_config": init.cfg.model_dump(),
        "trainer_config": tcfg,
        "replay_config": cfg.replay.model_dump(),
        "use_gpu": use_gpu,
    }


def scaling_config(cfg: RoundConfig) -> Any:
    from ray.train import ScalingConfig

    use_gpu = _use_gpu(cfg)
    return ScalingConfig(
        num_workers=cfg.trainer.num_workers,
        use_gpu=use_gpu,
        resources_per_worker=worker_resources(cfg.trainer, use_gpu),
    )


def run_config(cfg: RoundConfig, name: str, max_failures: int) -> Any:
    """Ray Train's run settings: checkpoints under ``trainer.storage_path`` (a local path or an
    object-store URI every node reaches), the last one kept."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig

    storage_fs = None
    if isinstance(cfg.trainer.storage_path, Path):
        storage_path = str(cfg.trainer.storage_path.resolve())
    else:  # object storage: every node of a cluster writes and reads checkpoints there
        storage_fs, storage_path = arrow_filesystem(cfg.trainer.storage_path, cfg.trainer.storage)
    return RunConfig(
        name=name,
        storage_path=storage_path,
        storage_filesystem=storage_fs,
        failure_config=FailureConfig(max_failures=max_failures),
        checkpoint_config=CheckpointConfig(num_to_keep=1),
    )


def train(
    init: Recommender,
    teacher: Recommender | None,
    examples: Examples,
    cfg: RoundConfig,
    cold: bool = False,
    run_id: str | None = None,
) -> tuple[Recommender, dict[str, float]]:
    """Run the Ray Train job; returns the trained model and the last reported metrics.

    ``run_id`` names the run: a run of that name already in storage is resumed from its last
    checkpoint (a round task retried elsewhere after its node died). None: a new name.

    ``cold``: no champion to start from, so ``first_round_epochs`` passes instead of ``epochs``.
    ``teacher`` (the champion) is shipped only when ``replay.kd_weight > 0``; the workers freeze
    it (``Recommender.frozen_teacher``). Raises ``RoundFailedError`` when the job fails after
    Ray Train's retries (``trainer.max_failures``). (``training.session.TrainingSession.train``
    does the same on workers kept up between rounds.)
    """
    import ray
    from ray.train.torch import TorchTrainer

    if not ray.is_initialized():
        ray.init(include_dashboard=False)
    data, job_config = round_job(init, teacher, examples, cfg, cold)
    default_id = f"{time.strftime('%Y%m%d-%H%M%S')}-{time.time_ns() % 10**6}"
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"data_ref": ray.put(data), **job_config},
        scaling_config=scaling_config(cfg),
        run_config=run_config(cfg, f"round-{run_id or default_id}", cfg.trainer.max_failures),
    )
    try:
        result = trainer.fit()
    except Exception as err:  # Ray Train wraps worker deaths and errors in its own types
        raise RoundFailedError(
            f"the training job failed after {cfg.trainer.max_failures} retries: "
            f"{type(err).__name__}: {err}"
        ) from err
    if result.error is not None or result.checkpoint is None:
        raise RoundFailedError(f"the training round produced no checkpoint: {result.error}")
    with result.checkpoint.as_directory() as d:
        model = Recommender.from_file(Path(d) / "model.safetensors", init.cfg)
    model.eval()
    metrics = {k: float(v) for k, v in (result.metrics or {}).items() if isinstance(v, int | float)}
    return model, metrics


def warm_up(registry: Registry, cfg: RoundConfig) -> None:
    """Start embedding the titles the next round will place new items by, in the background
    (a loop starting on an existing registry: its first round would otherwise load the encoder
    and embed the catalog's titles on the path from an event to a model trained on it)."""
    latest = registry.latest()
    if latest is None or not (cfg.model.item_repr == "id" and cfg.model.text_init):
        return
    path = registry.path(latest) / "titles.json"
    if path.exists():
        titles: dict[str, str] = json.loads(path.read_text())
        vocab = ItemVocab.load(registry.path(latest) / "vocab.json")
        warm_titles([titles[i] for i in vocab.items() if i in titles])


# The champion ranks the gate's questions here while the candidate trains in other processes
# (torch releases the GIL while it computes); one round at a time, so one thread.
_beside = ThreadPoolExecutor(max_workers=1, thread_name_prefix="champion-ranks")


def _round_kind(
    registry: Registry, base: int | None, warm: bool, replayable: int, rcfg: ReplayConfig
) -> tuple[str, int]:
    """This round's kind, and the rounds since the last consolidation once it is registered.

    The count lives in each version's meta, so it survives restarts and follows the lineage
    (rejected versions included: a rejected consolidation round is not retried at once).
    """
    if not warm:
        return "first", 0
    since = 1 if base is None else 1 + int(registry.meta(base).get("rounds_since_consolidation", 0))
    if rcfg.consolidate_every and since >= rcfg.consolidate_every and replayable:
        return "consolidation", 0
    return "incremental", since


class TrainFn(Protocol):
    """``train`` or a ``TrainingSession``'s: trains one round, returns model and metrics."""

    def __call__(
        self,
        init: Recommender,
        teacher: Recommender | None,
        examples: Examples,
        cfg: RoundConfig,
        cold: bool = False,
        run_id: str | None = None,
    ) -> tuple[Recommender, dict[str, float]]: ...


def run_round(
    new: pa.Table,
    context: pa.Table | None,
    watermark: dict[str, int],
    registry: Registry,
    cfg: RoundConfig,
    extra_meta: dict[str, Any] | None = None,
    read_history: Callable[[list[str]], pa.Table] | None = None,
    run_id: str | None = None,
    trainer: TrainFn | None = None,
    span: dict[str, Any] | None = None,
) -> RoundResult:
    """Train, gate and register one round; see the module docstring.

    ``span``: the offsets ``new`` came from (``{"after": ..., "upto": ...}``; default: from
    ``extra_meta["after_watermark"]`` to ``watermark``), recorded with what the version first
    trained on (``RoundResult.trained``) or left in the carry.

    ``context``: the new users' earlier events as a table, or None to take them from the
    latest version's per-user index (``training.histories``), which costs the round's users,
    not the whole history. A latest version written before that index existed has none; then
    ``read_history(users)`` (if given) reads them from the buffer once.

    ``trainer``: what trains the candidate; ``train`` (a Ray Train run for this round) unless a
    ``TrainingSession``'s ``train`` is given (workers kept up between rounds).

    Raises ``EmptyRoundError`` if the new events give no training example,
    ``RoundTooSmallError`` if they hold too few held-out users to gate, ``LineageError`` if
    the registry's item map no longer extends the champion's, ``RoundFailedError`` if training
    failed, ``ConcurrentRoundError`` if another round registered since this one read the
    registry, and ``NonFiniteWeightsError`` if the candidate's weights
    are not finite (nothing is registered or recorded in those cases).
    """
    t_start = time.monotonic()
    champ_v = registry.champion()
    base_v = registry.latest()  # the replay lineage continues from the latest version
    # The item map is one append-only lineage across every registered version, rejected ones
    # included: the replay reservoir (which continues from the latest version) stores rows of
    # that map, so restarting it from an older champion would point old examples at wrong rows.
    settings = _lineage_settings(cfg)
    state = lineage.take(registry, base_v, champ_v, settings) or lineage.read(
        registry, base_v, champ_v, cfg.model, cfg.replay.capacity, cfg.gate.replay_eval_size,
        cfg.gate.recent_questions, cfg.replay.seed,
    )  # fmt: skip
    champ, vocab, titles = state.champion, state.vocab, state.titles
    base_dir = registry.path(base_v) if base_v is not None else None
    users = sorted(set(new.column("user_id").to_pylist()))
    indexed: UserHistories | None = None
    if context is None and UserHistories.exists(base_dir):
        assert base_dir is not None
        max_len = (champ.model.cfg if champ else cfg.model).max_len
        indexed = UserHistories.load(base_dir, users, max_len)
    elif context is None:
        context = read_history(users) if read_history is not None and base_v is not None else None
    context = context if context is not None else new.slice(0, 0)
    titles.update(_titles(context))
    titles.update(_titles(new))
    rows_before = len(vocab)
    vocab.add(context.column("item_id").to_pylist() + new.column("item_id").to_pylist())
    if champ is not None and vocab.items()[: champ.vocab.n_items] != champ.vocab.items():
        raise LineageError(
            f"the item map of v{base_v} does not extend champion v{champ_v}'s: a row would point "
            "at another item; the registry's lineage is broken (restore the versions or start "
            "a new registry)"
        )
    if champ is not None and champ.model.n_rows != len(champ.vocab):
        raise LineageError(
            f"champion v{champ_v} has {champ.model.n_rows} item rows but {len(champ.vocab)} "
            "vocab rows: its files do not belong together"
        )
    # Rows the champion lacks: items new this round, and those of rounds rejected since it.
    added = vocab.items()[champ.model.n_rows - 1 :] if champ else []
    mcfg = champ.model.cfg if champ else cfg.model
    if mcfg.item_repr == "id" and mcfg.text_init:  # embedded while this round trains, for the next
        warm_titles([titles[i] for i in vocab.items() if i in titles])
    init = prepare_model(champ.model if champ else None, vocab, mcfg, titles, added)

    history = indexed or UserHistories.from_sequences(user_sequences(context, vocab), mcfg.max_len)
    new_seqs = user_sequences(new, vocab)
    new_ex, new_hold = round_examples(
        history.recent, new_seqs, mcfg.max_len, cfg.gate.holdout_events, seen=history.seen
    )
    # Rejected rounds since the champion: trained on again here (none for a fresh start, which
    # reads everything buffered anyway). A round with no new events of its own trains them alone.
    carry = state.carry if champ is not None else Carry.empty(mcfg.max_len)
    if len(new_ex) == 0 and len(carry) == 0:
        raise EmptyRoundError(
            f"{new.num_rows} new events from {len(set(new.column('user_id').to_pylist()))} users "
            "give no training example (each needs an earlier event of its user); wait for more"
        )
    # The gate's questions: the round's own, keyed by user, topped up from earlier rounds'.
    own_hold = replace(new_hold, users=user_keys(list(new_seqs))[new_hold.users])
    recent = state.recent
    gate_hold, borrowed = recent.top_up(own_hold, cfg.gate.min_eval_users)
    if gate_hold.n_users < cfg.gate.min_eval_users:
        # The gate could only reject it, and a rejected round's events are never trained on
        # again: leave them for the next round, which covers them and what arrives meanwhile.
        raise RoundTooSmallError(
            f"{new.num_rows} new events give {new_hold.n_users} held-out users "
            f"(+{borrowed} from earlier rounds' questions; < gate.min_eval_users="
            f"{cfg.gate.min_eval_users}): too few to gate; wait for more"
        )
    reservoir = state.reservoir
    # Forgetting is measured on earlier rounds' held-out questions, which no version trained on.
    # (Replayed training examples would not do: the champion memorised them, so any update
    # "forgets" them, and the gate would reject nearly every small round.)
    probes = state.probes
    replay_hold = holdout_from_examples(Examples(probes.inputs, probes.targets))
    kind, since = _round_kind(registry, base_v, champ is not None, len(reservoir), cfg.replay)
    n_replay = int(cfg.replay.ratio * (len(new_ex) + len(carry)))
    train_cfg = cfg
    if kind == "consolidation":
        n_replay = max(n_replay, cfg.replay.consolidate_examples)
        train_cfg = cfg.model_copy(
            update={"trainer": cfg.trainer.model_copy(
                update={"epochs": cfg.replay.consolidate_epochs})}
        )  # fmt: skip
    replay_ex = reservoir.sample(n_replay)
    train_ex = new_ex.concat(carry.examples).concat(replay_ex)

    t_train = time.monotonic()
    champ_ranks = (
        _beside.submit(question_ranks, champ.model, gate_hold, replay_hold) if champ else None
    )  # fmt: skip
    candidate, train_metrics = (trainer or train)(
        init, champ.model if champ else None, train_ex, train_cfg, cold=champ is None,
        run_id=run_id,
    )  # fmt: skip
    t_gate = time.monotonic()
    train_s = t_gate - t_train

    counts = np.bincount(
        np.asarray(vocab.encode(new.column("item_id").to_pylist()), dtype=np.int64),
        minlength=len(vocab),
    )
    decision = gate(candidate, champ.model if champ else None, gate_hold, replay_hold, counts,
                    cfg.gate, champ_ranks.result() if champ_ranks else None)  # fmt: skip
    decision.metrics.update(gate_users_own=new_hold.n_users, gate_users_borrowed=borrowed)
    t_register = time.monotonic()
    after = (extra_meta or {}).get("after_watermark", {})
    own_span = {**(span or {"after": after, "upto": watermark}), "events": new.num_rows,
                "ts_q": _ts_quantiles(new)}  # fmt: skip
    carried_events = carry.events
    spans = [*carry.spans, own_span]  # what the candidate trained on for the first time
    if decision.promote:
        trained, dropped = spans, []
        carry = Carry.empty(mcfg.max_len)
    else:
        trained = []
        dropped = carry.add(new_ex, own_span, cfg.replay.carry_max_examples)
    reservoir.add(new_ex)
    probes.add(holdout_as_examples(new_hold))
    recent.add(own_hold)

    popularity = _popularity(state.popularity, vocab, new)

    def write(d: Path) -> None:
        save_weights(candidate, d / "model.safetensors")
        (d / "popularity.json").write_text(json.dumps(popularity))
        vocab.save(d / "vocab.json")
        (d / "titles.json").write_text(json.dumps(titles))
        reservoir.save(d)
        probes.save(d, name="replay_eval")
        recent.save(d)
        history.extended(new_seqs).save(d, base_dir)
        if len(carry):
            carry.save(d)

    ts = new.column("ts")
    meta: dict[str, Any] = {
        "parent": champ_v,
        "watermark": watermark,
        "data_max_ts": int(pa.compute.max(ts).as_py()) if new.num_rows else None,
        "model_config": mcfg.model_dump(),
        "trainer_config": train_cfg.trainer.model_dump(mode="json"),
        "kind": kind,
        "rounds_since_consolidation": since,
        "replay_config": cfg.replay.model_dump(),
        "gate_config": cfg.gate.model_dump(),  # which questions it was judged on (gate_review)
        "metrics": {**decision.metrics, **{f"train_{k}": v for k, v in train_metrics.items()}},
        "decision": "promote" if decision.promote else "reject",
        "reason": decision.reason,
        "new_events": new.num_rows,
        "train_examples": len(train_ex),
        "replay_examples": len(replay_ex),
        "carried_examples": len(train_ex) - len(new_ex) - len(replay_ex),
        "carried_events": carried_events,
        "carry_events": carry.events,  # waiting for the next round, if this one was rejected
        "trained": trained,
        "spans": spans,  # if it serves after all (a manual promotion): its events' freshness
        "dropped": dropped,
        "items_added": len(vocab) - rows_before,
        "n_items": vocab.n_items,
        "train_s": train_s,
        **(extra_meta or {}),
    }
    try:
        version = registry.register(
            write, meta, promote=decision.promote, reason=decision.reason, expect_latest=base_v
        )
    except NonFiniteWeightsError as err:
        raise NonFiniteWeightsError(
            f"round over {new.num_rows} new events trained a candidate with non-finite weights "
            f"(gate: {decision.reason}); nothing was registered or recorded: {err}"
        ) from err
    champion = state.champion
    if decision.promote:  # the candidate is the next round's champion: no need to read it back
        champion = LoadedVersion(
            version, candidate, ItemVocab(vocab.items()), registry.meta(version),
            registry.path(version),
        )  # fmt: skip
    lineage.keep(registry, lineage.Lineage(
        base=version, champion=champion, vocab=vocab, titles=titles, popularity=popularity,
        carry=carry, recent=recent, reservoir=reservoir, probes=probes,
    ), settings)  # fmt: skip
    return RoundResult(
        version=version,
        promoted=decision.promote,
        reason=decision.reason,
        watermark=watermark,
        metrics=meta["metrics"],
        new_events=new.num_rows,
        items_added=len(vocab) - rows_before,
        train_s=train_s,
        trained=trained,
        dropped=dropped,
        carried_events=carried_events,
        kind=kind,
        phases={
            "prepare": t_train - t_start,
            "train": train_s,
            "gate": t_register - t_gate,
            "register": time.monotonic() - t_register,
        },
    )
