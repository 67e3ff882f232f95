"""A replica's side of a live trial: which two loaded versions play it, and the interleaved answer.

The trial (``training.registry.LiveTrial``, recorded by the rollout controller) names team a's
version and the newest of team b's lineage. A replica plays whichever of them it serves against
the other, which it keeps loaded beside it: serving a's version, the other is b's newest; serving
anything else (the serving lineage moved on before the trial record did), that version plays b
against a. Each version ranks the request on its own (its scores, seen-item exclusion and MMR),
and team draft merges the two rankings into ``k`` positions, each tagged with its contributor.
The other version scores the request in the same batch as the serving one
(``serving.scoring.score_asks``); a request its scores fail gets the serving version's own answer.
"""

from __future__ import annotations

import random

from fastapi import HTTPException

from serving.api import ScoredItem
from serving.clicks import Served
from serving.interleaving import team_draft
from serving.mmr import mmr
from serving.scoring import Scored
from serving.streak import Streak
from training.registry import LiveTrial


def other_version(trial: LiveTrial, serving: int) -> int:
    """The version a replica serving ``serving`` must load beside it to play ``trial``."""
    return trial.b if serving == trial.a else trial.a


def ranked(got: Scored, k: int, diversity: float, tag: bool = False) -> list[ScoredItem]:
    """One version's own answer: its top ``k`` after seen-item exclusion (the candidates) and
    MMR; ``tag``: each item names the version (an interleaved answer's parts)."""
    scores = got.scores()
    assert got.candidates is not None, "a /recommend ask always asks for candidates"
    picked = mmr(scores, got.m.unit_emb, got.candidates, k, diversity)
    values = scores[picked].tolist()
    return [
        ScoredItem(item_id=got.m.vocab.item(r), score=v, version=got.m.version if tag else None)
        for r, v in zip(picked, values, strict=True)
    ]


def interleave(
    trial: LiveTrial, mine: Scored, other: Scored, k: int, diversity: float, rng: random.Random
) -> tuple[list[ScoredItem], Served]:
    """The interleaved answer and what the click side must know of it."""
    a, b = (mine, other) if mine.m.version == trial.a else (other, mine)
    by_a, by_b = ranked(a, k, diversity, tag=True), ranked(b, k, diversity, tag=True)
    picks = {"a": {it.item_id: it for it in by_a}, "b": {it.item_id: it for it in by_b}}
    merged = team_draft([it.item_id for it in by_a], [it.item_id for it in by_b], k, rng)
    # a shared pick names no version: both put it there, and its clicks credit neither
    answer = [
        picks[team][item]
        if team in picks
        else picks["a"][item].model_copy(update={"version": None})
        for item, team in zip(merged.items, merged.teams, strict=True)
    ]
    served = Served(
        items=list(merged.items),
        version=str(a.m.version),
        trial=trial.id,
        teams="".join(merged.teams),
        other=str(b.m.version),
    )
    return answer, served


def answer(
    got: Scored,
    trial: LiveTrial | None,
    k: int,
    diversity: float,
    rng: random.Random,
    theirs_failed: Streak | None = None,
) -> tuple[list[ScoredItem], Served, LiveTrial | None]:
    """A /recommend's answer, what the click side must know of it, and the trial it plays.

    Interleaved when its batch scored it by ``trial``'s other version too (``got.theirs``);
    else the serving version's own ranking (``trial`` None), as when the other version's scores
    failed: a broken other version must not fail requests the serving one can answer.
    """
    theirs = got.theirs
    if (
        trial is not None
        and theirs is not None
        and theirs.m.version == other_version(trial, got.m.version)  # the trial moved on since
    ):
        if not isinstance(theirs.result, HTTPException):
            if theirs_failed is not None:
                theirs_failed.ok()
            items, served = interleave(trial, got, theirs, k, diversity, rng)
            return items, served, trial
        if theirs_failed is not None:
            theirs_failed.failed(theirs.result, "answering with the serving version alone")
    # the shared ranking rule (padding, excluded and non-finite rows are never picked, MMR)
    items = ranked(got, k, diversity)
    return items, Served([i.item_id for i in items], str(got.m.version)), None
