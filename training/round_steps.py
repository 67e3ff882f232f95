"""The first steps of a round: plan -> examples -> questions (what it trains and is judged on).

``training.round.run_round`` runs them, then ``training.round_finish``'s train -> gate ->
commit. Each step takes the values the steps before it returned and returns its own typed
value; none touches the registry's files but ``plan``, which reads the latest version.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path
from typing import Any

import pyarrow as pa

from training import lineage
from training.carry import Carry
from training.config import ModelConfig
from training.data import (
    Examples,
    Holdout,
    holdout_from_examples,
    round_examples,
    user_sequences,
)
from training.errors import EmptyRoundError, LineageError, RoundTooSmallError
from training.histories import UserHistories
from training.model import Recommender
from training.questions import user_keys
from training.registry import Registry
from training.round_config import RoundConfig
from training.round_train import prepare_model
from training.textinit import warm as warm_titles

ReadHistory = Callable[[list[str]], pa.Table]  # users -> their earlier events, from the buffer


@dataclass(frozen=True)
class RoundInput:
    """What a round is given: its new events and where they sit in the buffer."""

    new: pa.Table  # the events since the last round
    context: pa.Table | None  # the new users' earlier events; None: from the history index
    watermark: dict[str, int]  # the buffer offsets ``new`` ends at
    extra_meta: dict[str, Any]  # recorded in the version's meta (``after_watermark``, ...)
    span: dict[str, Any] | None  # the offsets ``new`` came from; None: from extra_meta
    run_id: str | None  # names the training run (a retried round task resumes it)

    @cached_property
    def users(self) -> list[str]:
        return sorted(set(self.new.column("user_id").to_pylist()))


@dataclass
class Plan:
    """Step 1: what the round continues from and the model it starts training at."""

    state: lineage.Lineage  # the latest version's state, changed by the round as it goes
    champ_v: int | None
    base_v: int | None  # the latest version: the lineage continues from it
    base_dir: Path | None
    settings: str  # the settings the kept lineage was made under (``lineage_settings``)
    mcfg: ModelConfig  # the champion's model settings (cfg.model without a champion)
    init: Recommender  # the champion grown to the round's catalog, or a fresh model
    history: UserHistories  # the round's users' histories before the round
    rows_before: int  # item rows before the round's new items


@dataclass(frozen=True)
class RoundExamples:
    """Step 2: the round's own training examples and held-out questions, and the carry."""

    new_seqs: dict[str, list[int]]  # user -> the round's item rows
    new_ex: Examples
    new_hold: Holdout
    carry: Carry  # rejected rounds' examples since the champion, trained on again


@dataclass(frozen=True)
class Questions:
    """Step 3: what the gate asks both models."""

    own_hold: Holdout  # the round's own questions, keyed by user
    gate_hold: Holdout  # those, topped up from earlier rounds' questions
    borrowed: int  # users topped up from earlier rounds
    replay_hold: Holdout  # earlier rounds' questions no version trained on: forgetting


def lineage_settings(cfg: RoundConfig) -> str:
    """The settings that shape the state a round reads (its reservoirs' and questions' sizes)."""
    return json.dumps([cfg.model.max_len, cfg.replay.model_dump(), cfg.gate.model_dump()])


def titles_of(table: pa.Table) -> dict[str, str]:
    out: dict[str, str] = {}
    for item, text in zip(
        table.column("item_id").to_pylist(), table.column("item_text").to_pylist(), strict=True
    ):
        if text:
            out[item] = text
    return out


def plan(
    registry: Registry,
    inp: RoundInput,
    cfg: RoundConfig,
    read_history: ReadHistory | None,
) -> Plan:
    """Read what the round continues from, grow the item map, and prepare the starting model."""
    champ_v = registry.champion()
    base_v = registry.latest()  # the replay lineage continues from the latest version
    # The item map is one append-only lineage across every registered version, rejected ones
    # included: the replay reservoir (which continues from the latest version) stores rows of
    # that map, so restarting it from an older champion would point old examples at wrong rows.
    settings = lineage_settings(cfg)
    state = lineage.take(registry, base_v, champ_v, settings) or lineage.read(
        registry, base_v, champ_v, cfg.model, cfg.replay.capacity, cfg.gate.replay_eval_size,
        cfg.gate.recent_questions, cfg.replay.seed,
    )  # fmt: skip
    champ, vocab, titles = state.champion, state.vocab, state.titles
    base_dir = registry.path(base_v) if base_v is not None else None
    indexed, context = _history_source(inp, state, base_v, base_dir, cfg, read_history)
    titles.update(titles_of(context))
    titles.update(titles_of(inp.new))
    rows_before = len(vocab)
    vocab.add(context.column("item_id").to_pylist() + inp.new.column("item_id").to_pylist())
    _check_lineage(state, base_v, champ_v)
    # Rows the champion lacks: items new this round, and those of rounds rejected since it.
    added = vocab.items()[champ.model.n_rows - 1 :] if champ else []
    mcfg = champ.model.cfg if champ else cfg.model
    if mcfg.item_repr == "id" and mcfg.text_init:  # embedded while this round trains, for the next
        warm_titles([titles[i] for i in vocab.items() if i in titles])
    init = prepare_model(champ.model if champ else None, vocab, mcfg, titles, added)
    history = indexed or UserHistories.from_sequences(user_sequences(context, vocab), mcfg.max_len)
    return Plan(state, champ_v, base_v, base_dir, settings, mcfg, init, history, rows_before)


def _history_source(
    inp: RoundInput,
    state: lineage.Lineage,
    base_v: int | None,
    base_dir: Path | None,
    cfg: RoundConfig,
    read_history: ReadHistory | None,
) -> tuple[UserHistories | None, pa.Table]:
    """The round's users' histories: from the latest version's index when ``inp`` has no
    context, else from the context (the buffer's, read once when the version has no index)."""
    context = inp.context
    if context is None and UserHistories.exists(base_dir):
        assert base_dir is not None
        champ = state.champion
        max_len = (champ.model.cfg if champ else cfg.model).max_len
        return UserHistories.load(base_dir, inp.users, max_len), inp.new.slice(0, 0)
    if context is None and read_history is not None and base_v is not None:
        context = read_history(inp.users)
    return None, context if context is not None else inp.new.slice(0, 0)


def _check_lineage(state: lineage.Lineage, base_v: int | None, champ_v: int | None) -> None:
    champ, vocab = state.champion, state.vocab
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


def examples(p: Plan, inp: RoundInput, cfg: RoundConfig) -> RoundExamples:
    """The round's examples (each new event after its user's history) and held-out questions."""
    new_seqs = user_sequences(inp.new, p.state.vocab)
    new_ex, new_hold = round_examples(
        p.history.recent, new_seqs, p.mcfg.max_len, cfg.gate.holdout_events, seen=p.history.seen
    )
    # Rejected rounds since the champion: trained on again here (none for a fresh start, which
    # reads everything buffered anyway). A round with no new events of its own trains them alone.
    carry = p.state.carry if p.state.champion is not None else Carry.empty(p.mcfg.max_len)
    if len(new_ex) == 0 and len(carry) == 0:
        raise EmptyRoundError(
            f"{inp.new.num_rows} new events from {len(inp.users)} users "
            "give no training example (each needs an earlier event of its user); wait for more"
        )
    return RoundExamples(new_seqs, new_ex, new_hold, carry)


def questions(p: Plan, ex: RoundExamples, inp: RoundInput, cfg: RoundConfig) -> Questions:
    """The gate's questions: the round's own, keyed by user, topped up from earlier rounds'."""
    own_hold = replace(ex.new_hold, users=user_keys(list(ex.new_seqs))[ex.new_hold.users])
    gate_hold, borrowed = p.state.recent.top_up(own_hold, cfg.gate.min_eval_users)
    if gate_hold.n_users < cfg.gate.min_eval_users:
        # The gate could only reject it, and a rejected round's events are never trained on
        # again: leave them for the next round, which covers them and what arrives meanwhile.
        raise RoundTooSmallError(
            f"{inp.new.num_rows} new events give {ex.new_hold.n_users} held-out users "
            f"(+{borrowed} from earlier rounds' questions; < gate.min_eval_users="
            f"{cfg.gate.min_eval_users}): too few to gate; wait for more"
        )
    # Forgetting is measured on earlier rounds' held-out questions, which no version trained on.
    # (Replayed training examples would not do: the champion memorised them, so any update
    # "forgets" them, and the gate would reject nearly every small round.)
    probes = p.state.probes
    replay_hold = holdout_from_examples(Examples(probes.inputs, probes.targets))
    return Questions(own_hold, gate_hold, borrowed, replay_hold)
