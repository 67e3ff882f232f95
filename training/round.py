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

A round is six steps, each a function with typed inputs and outputs, run in order below:
``plan`` (the latest version's state, the round's users' histories, the starting model),
``examples`` (training examples and held-out questions), ``questions`` (the gate's, topped up
from earlier rounds'), ``train_candidate``, ``judge`` (the gate) and ``commit`` (register with
the decision, keep the lineage). The first three are in ``training.round_steps``, the last three
in ``training.round_finish``, the Ray Train job in ``training.round_train``. Between questions
and training, ``training.recipe.choose`` picks the recipe (a first version's search with
``tune.first_version``, else the configured one; later versions inherit the champion's) and
records it in the version's meta. Every way a round runs goes through ``run_round``: in process
(``services.loop``), as a cluster task (``services.round_job``), and with the long-lived workers
of ``training.session`` as its ``trainer``.
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any

import pyarrow as pa

from training.recipe import RECIPE_KEY, choose
from training.registry import Registry
from training.round_config import RoundConfig, RoundResult, TrainFn
from training.round_finish import commit, judge, round_kind, train_candidate
from training.round_steps import (
    ReadHistory,
    RoundInput,
    examples,
    lineage_settings,
    plan,
    questions,
)
from training.round_train import (
    prepare_model,
    round_job,
    run_config,
    scaling_config,
    train,
    worker_resources,
)
from training.textinit import warm as warm_titles

__all__ = [
    "RoundConfig",
    "RoundResult",
    "TrainFn",
    "lineage_settings",
    "prepare_model",
    "round_job",
    "round_kind",
    "run_config",
    "run_round",
    "scaling_config",
    "train",
    "warm_up",
    "worker_resources",
]


def warm_up(registry: Registry, cfg: RoundConfig) -> None:
    """Start embedding the titles the next round will place new items by, in the background
    (a loop starting on an existing registry: its first round would otherwise load the encoder
    and embed the catalog's titles on the path from an event to a model trained on it)."""
    latest = registry.latest()
    if latest is None or not (cfg.model.item_repr == "id" and cfg.model.text_init):
        return
    # Titles to warm the encoder with, not trained from: no re-hash of the whole version here
    # (at 1M users its history index is hundreds of MB; the first round verifies what it reads).
    content = registry.content(latest, verify=False)
    if content.titles:
        warm_titles([content.titles[i] for i in content.vocab.items() if i in content.titles])


def run_round(
    new: pa.Table,
    context: pa.Table | None,
    watermark: dict[str, int],
    registry: Registry,
    cfg: RoundConfig,
    extra_meta: dict[str, Any] | None = None,
    read_history: ReadHistory | None = None,
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
    inp = RoundInput(new, context, watermark, extra_meta or {}, span, run_id)
    p = plan(registry, inp, cfg, read_history)
    ex = examples(p, inp, cfg)
    q = questions(p, ex, inp, cfg)
    # Before train_candidate: a long-lived session starts its workers at its first round's
    # training, so a first round's search runs while they hold none of the CPUs.
    chosen = choose(p, ex, cfg)
    p, cfg = chosen.plan, chosen.cfg
    inp = replace(inp, extra_meta={**inp.extra_meta,
                                   RECIPE_KEY: chosen.record.model_dump(mode="json")})  # fmt: skip
    trained = train_candidate(registry, p, ex, q, cfg, trainer, run_id)
    t_gate = time.monotonic()
    decision = judge(p, ex, q, trained, inp, cfg)
    t_register = time.monotonic()
    result = commit(registry, p, ex, q, trained, decision, inp, cfg)
    result.phases = {
        "prepare": t_gate - t_start - trained.seconds - chosen.search_s,
        "train": trained.seconds,
        "gate": t_register - t_gate,
        "register": time.monotonic() - t_register,
    }
    if chosen.search_s:
        result.phases["search"] = chosen.search_s
    return result
