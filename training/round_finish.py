"""The last steps of a round: train -> gate -> commit (after ``training.round_steps``).

``train_candidate`` samples the replay and trains the candidate (the champion ranks the gate's
questions beside it), ``judge`` runs the gate, and ``commit`` registers the version with its
decision in one step and keeps the lineage for the next round of this process.
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from training import lineage
from training.carry import TRAINED, Carry
from training.config import ReplayConfig
from training.data import holdout_as_examples
from training.errors import NonFiniteWeightsError
from training.gate import GateResult, gate, question_ranks
from training.model import Recommender
from training.registry import LoadedVersion, Registry, VersionContent, write_content
from training.round_config import RoundConfig, RoundResult, TrainFn
from training.round_steps import Plan, Questions, RoundExamples, RoundInput
from training.round_train import train
from training.vocab import ItemVocab

# The champion ranks the gate's questions here while the candidate trains in other processes
# (torch releases the GIL while it computes); one round at a time, so one thread.
_beside = ThreadPoolExecutor(max_workers=1, thread_name_prefix="champion-ranks")


@dataclass
class Trained:
    """Step 4: the candidate, and what it was trained on."""

    candidate: Recommender
    metrics: dict[str, float]  # the training run's last reported metrics
    kind: str  # "first", "incremental" or "consolidation"
    since: int  # rounds since the last consolidation, once registered
    cfg: RoundConfig  # the settings it trained under (a consolidation's epochs)
    train_examples: int
    replay_examples: int
    champ_ranks: Future[Any] | None  # the champion's ranks of the questions, computed beside
    seconds: float


def round_kind(
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


def train_candidate(
    registry: Registry,
    p: Plan,
    ex: RoundExamples,
    q: Questions,
    cfg: RoundConfig,
    trainer: TrainFn | None,
    run_id: str | None,
) -> Trained:
    """Train the candidate on the round's examples, the carry and a replay sample."""
    champ, reservoir = p.state.champion, p.state.reservoir
    kind, since = round_kind(registry, p.base_v, champ is not None, len(reservoir), cfg.replay)
    n_replay = int(cfg.replay.ratio * (len(ex.new_ex) + len(ex.carry)))
    train_cfg = cfg
    if kind == "consolidation":
        n_replay = max(n_replay, cfg.replay.consolidate_examples)
        train_cfg = cfg.model_copy(
            update={"trainer": cfg.trainer.model_copy(
                update={"epochs": cfg.replay.consolidate_epochs})}
        )  # fmt: skip
    replay_ex = reservoir.sample(n_replay)
    train_ex = ex.new_ex.concat(ex.carry.examples).concat(replay_ex)

    t_train = time.monotonic()
    champ_ranks = (
        _beside.submit(question_ranks, champ.model, q.gate_hold, q.replay_hold) if champ else None
    )  # fmt: skip
    candidate, metrics = (trainer or train)(
        p.init, champ.model if champ else None, train_ex, train_cfg, cold=champ is None,
        run_id=run_id,
    )  # fmt: skip
    return Trained(candidate, metrics, kind, since, train_cfg, len(train_ex), len(replay_ex),
                   champ_ranks, time.monotonic() - t_train)  # fmt: skip


def judge(
    p: Plan, ex: RoundExamples, q: Questions, t: Trained, inp: RoundInput, cfg: RoundConfig
) -> GateResult:
    """Step 5: the gate's decision on the candidate against the champion."""
    champ = p.state.champion
    counts = np.bincount(
        np.asarray(p.state.vocab.encode(inp.new.column("item_id").to_pylist()), dtype=np.int64),
        minlength=len(p.state.vocab),
    )
    champ_ranks = t.champ_ranks.result() if t.champ_ranks else None
    decision = gate(t.candidate, champ.model if champ else None, q.gate_hold, q.replay_hold,
                    counts, cfg.gate, champ_ranks)  # fmt: skip
    decision.metrics.update(gate_users_own=ex.new_hold.n_users, gate_users_borrowed=q.borrowed)
    return decision


@dataclass(frozen=True)
class Settled:
    """What the decision leaves: the spans trained or dropped, the carry, the counts."""

    spans: list[dict[str, Any]]  # what the candidate trained on for the first time
    trained: list[dict[str, Any]]  # those, if promoted
    dropped: list[dict[str, Any]]  # spans the bounded carry let go (never trained on)
    carried_events: int
    carry: Carry  # what the next round trains on again
    popularity: list[int]
    first_trained: Carry | None = None  # promoted: its examples, kept in case of a rollback


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


def settle(
    p: Plan, ex: RoundExamples, q: Questions, promote: bool, inp: RoundInput, cfg: RoundConfig
) -> Settled:
    """Apply the decision to the lineage's state: carry, reservoirs, questions, popularity."""
    after = inp.extra_meta.get("after_watermark", {})
    own_span = {**(inp.span or {"after": after, "upto": inp.watermark}),
                "events": inp.new.num_rows, "ts_q": _ts_quantiles(inp.new)}  # fmt: skip
    carry = ex.carry
    carried_events = carry.events
    spans = [*carry.spans, own_span]
    first_trained = None
    if promote:
        trained, dropped = spans, []
        first_trained = Carry(
            carry.examples.concat(ex.new_ex), spans, [*carry.sizes, len(ex.new_ex)]
        )
        carry = Carry.empty(p.mcfg.max_len)
    else:
        trained = []
        dropped = carry.add(ex.new_ex, own_span, cfg.replay.carry_max_examples)
    state = p.state
    state.reservoir.add(ex.new_ex)
    state.probes.add(holdout_as_examples(ex.new_hold))
    state.recent.add(q.own_hold)
    popularity = _popularity(state.popularity, state.vocab, inp.new)
    return Settled(spans, trained, dropped, carried_events, carry, popularity, first_trained)


def _files(p: Plan, ex: RoundExamples, t: Trained, s: Settled) -> Any:
    """The version's files, written by the registry into its upload directory."""
    state = p.state

    def write(d: Path) -> None:
        write_content(d, t.candidate, VersionContent(state.vocab, s.popularity, state.titles))
        state.reservoir.save(d)
        state.probes.save(d, name="replay_eval")
        state.recent.save(d)
        p.history.extended(ex.new_seqs).save(d, p.base_dir)
        if len(s.carry):
            s.carry.save(d)
        if s.first_trained is not None and len(s.first_trained):
            s.first_trained.save(d, TRAINED)

    return write


def _meta(
    p: Plan,
    ex: RoundExamples,
    t: Trained,
    d: GateResult,
    s: Settled,
    inp: RoundInput,
    cfg: RoundConfig,
) -> dict[str, Any]:
    new, vocab = inp.new, p.state.vocab
    ts = new.column("ts")
    return {
        "parent": p.champ_v,
        "watermark": inp.watermark,
        "data_max_ts": int(pa.compute.max(ts).as_py()) if new.num_rows else None,
        "model_config": p.mcfg.model_dump(),
        "trainer_config": t.cfg.trainer.model_dump(mode="json"),
        "kind": t.kind,
        "rounds_since_consolidation": t.since,
        "replay_config": cfg.replay.model_dump(),
        "gate_config": cfg.gate.model_dump(),  # which questions it was judged on (gate_review)
        "metrics": {**d.metrics, **{f"train_{k}": v for k, v in t.metrics.items()}},
        "decision": "promote" if d.promote else "reject",
        "reason": d.reason,
        "new_events": new.num_rows,
        "train_examples": t.train_examples,
        "replay_examples": t.replay_examples,
        "carried_examples": t.train_examples - len(ex.new_ex) - t.replay_examples,
        "carried_events": s.carried_events,
        "carry_events": s.carry.events,  # waiting for the next round, if this one was rejected
        "trained": s.trained,
        "spans": s.spans,  # if it serves after all (a manual promotion): its events' freshness
        "dropped": s.dropped,
        "items_added": len(vocab) - p.rows_before,
        "n_items": vocab.n_items,
        "train_s": t.seconds,
        **inp.extra_meta,
    }


def commit(
    registry: Registry,
    p: Plan,
    ex: RoundExamples,
    q: Questions,
    t: Trained,
    d: GateResult,
    inp: RoundInput,
    cfg: RoundConfig,
) -> RoundResult:
    """Step 6: settle the decision, register the version with it, keep the lineage."""
    s = settle(p, ex, q, d.promote, inp, cfg)
    meta = _meta(p, ex, t, d, s, inp, cfg)
    try:
        version = registry.register(
            _files(p, ex, t, s), meta, promote=d.promote, reason=d.reason, expect_latest=p.base_v
        )
    except NonFiniteWeightsError as err:
        raise NonFiniteWeightsError(
            f"round over {inp.new.num_rows} new events trained a candidate with non-finite "
            f"weights (gate: {d.reason}); nothing was registered or recorded: {err}"
        ) from err
    state, champion = p.state, p.state.champion
    if d.promote:  # the candidate is the next round's champion: no need to read it back
        champion = LoadedVersion(
            version, t.candidate, ItemVocab(state.vocab.items()), registry.meta(version),
            registry.path(version), list(s.popularity),
        )  # fmt: skip
    lineage.keep(registry, lineage.Lineage(
        base=version, champion=champion, vocab=state.vocab, titles=state.titles,
        popularity=s.popularity, carry=s.carry, recent=state.recent, reservoir=state.reservoir,
        probes=state.probes,
    ), p.settings)  # fmt: skip
    return RoundResult(
        version=version, promoted=d.promote, reason=d.reason, watermark=inp.watermark,
        metrics=meta["metrics"], new_events=inp.new.num_rows,
        items_added=len(state.vocab) - p.rows_before, train_s=t.seconds, trained=s.trained,
        dropped=s.dropped, carried_events=s.carried_events, kind=t.kind,
    )  # fmt: skip
