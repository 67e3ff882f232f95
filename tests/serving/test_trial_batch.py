"""A live trial's second version scored in the replica's batch, without a cluster.

The asks drawn for an interleaved answer are scored by the trial's other version too, in the
same batch: one history look-up for all, one forward of the other version over just those asks,
each ranked by that version's own scores and catalog. A failure of the other version falls back
to the serving version's own answer instead of failing the request.
"""

from __future__ import annotations

import asyncio
import logging
import random
from dataclasses import replace

import torch
from fastapi import HTTPException

from serving.live_answer import answer, ranked
from serving.scoring import Ask, Loaded, Scored, score_asks, score_rows
from serving.streak import Streak
from training.ranking import top_k_rows
from training.registry import LiveTrial

from .test_live_answer import _version

SHARED = [f"i{n}" for n in range(1, 40)]
ONLY_MINE, ONLY_THEIRS = "mine-only", "theirs-only"
TRIAL = LiveTrial(id="t1", mode="canary", a=3, b=5, b_versions=[5], share=1.0)


def _counting(m: Loaded, shapes: list[tuple[int, ...]]) -> Loaded:
    real = m.score

    def counting(x: torch.Tensor) -> torch.Tensor:
        shapes.append(tuple(x.shape))
        return real(x)

    return replace(m, score=counting)


# The serving version's catalog has an item the other's lacks, and the other's has one of its own
# placed first, so the two vocabs give the shared items different rows.
def _mine() -> Loaded:
    return _version(3, 0, [*SHARED, ONLY_MINE])


def _theirs() -> Loaded:
    return _version(5, 1, [ONLY_THEIRS, *SHARED])


LIVE = {"u1": ["i3", "i4", ONLY_MINE], "u2": ["i7", ONLY_THEIRS], "u3": []}


def _batch(mine: Loaded, theirs: Loaded | None, asks: list[Ask]) -> tuple[list[Scored], int]:
    calls: list[list[str]] = []

    async def histories(users: list[str]) -> list[list[str]]:
        calls.append(users)
        return [LIVE[u] for u in users]

    out = asyncio.run(score_asks(mine, asks, histories, theirs))
    return out, len(calls)


ASKS = [
    Ask(None, "u1", 50, True, both=True),
    Ask(["i1", "i2"], None, 50, True),
    Ask(None, "u2", 50, True, both=True),
    Ask(None, "u3", 50, True),
    Ask(["i9", ONLY_THEIRS, ONLY_MINE], None, 50, True, both=True),
    Ask(["i5"], None),  # a /score: never drawn
]


def test_one_lookup_and_one_other_forward_over_just_the_asks_that_want_both() -> None:
    mine_shapes: list[tuple[int, ...]] = []
    theirs_shapes: list[tuple[int, ...]] = []
    mine = _counting(_mine(), mine_shapes)
    theirs = _counting(_theirs(), theirs_shapes)
    out, lookups = _batch(mine, theirs, ASKS)
    assert lookups == 1  # the same histories serve both versions
    assert mine_shapes == [(5, 8)]  # everyone with a usable history (u3 has none)
    assert theirs_shapes == [(3, 8)]  # exactly the three asks that want both
    assert [s.theirs is not None for s in out] == [a.both for a in ASKS]
    assert all(s.m is mine for s in out)
    for s in out:
        if s.theirs is not None:
            assert s.theirs.m is theirs and s.theirs.theirs is None
            assert s.theirs.history == s.history  # the same request, by the other version


def test_each_version_encodes_the_history_with_its_own_vocab() -> None:
    mine, theirs = _mine(), _theirs()
    out, _ = _batch(mine, theirs, ASKS)
    u1, u2, sent = out[0], out[2], out[4]
    assert u1.rows == mine.vocab.encode(["i3", "i4", ONLY_MINE]) and len(u1.rows) == 3
    assert u1.theirs is not None and u1.theirs.rows == theirs.vocab.encode(["i3", "i4"])
    assert u1.theirs.rows != u1.rows[:2]  # the shared items sit on other rows there
    assert u2.rows == mine.vocab.encode(["i7"])
    assert u2.theirs is not None and len(u2.theirs.rows) == 2
    assert sent.theirs is not None and len(sent.rows) == 2 and len(sent.theirs.rows) == 2


def test_theirs_ranks_by_the_other_versions_own_scores() -> None:
    mine, theirs = _mine(), _theirs()
    out, _ = _batch(mine, theirs, ASKS)
    for s in out:
        if s.theirs is None:
            continue
        t = s.theirs
        alone = score_rows(theirs, [t.rows])[0]
        assert isinstance(alone, torch.Tensor)
        assert torch.allclose(t.scores()[1:], alone[1:], rtol=1e-5, atol=1e-5)
        assert t.source == ("history" if t.rows else "popularity")
        want = top_k_rows(alone.unsqueeze(0), 50, [t.rows])[0]
        assert t.candidates is not None and t.candidates.tolist() == want.tolist()
        assert not set(t.candidates.tolist()) & set(t.rows)  # its seen items are excluded
        # its own answer names only items of its own catalog, never seen ones
        ids = [it.item_id for it in ranked(t, 10, 0.0)]
        assert ONLY_MINE not in ids and not set(ids) & set(s.history)


def test_the_serving_versions_answers_are_as_without_a_trial() -> None:
    mine = _mine()
    with_trial, _ = _batch(mine, _theirs(), ASKS)
    without, _ = _batch(mine, None, ASKS)
    assert all(s.theirs is None for s in without)
    for a, b in zip(with_trial, without, strict=True):
        assert a.rows == b.rows and a.source == b.source
        assert torch.allclose(a.scores()[1:], b.scores()[1:], rtol=1e-5, atol=1e-5)
        if b.candidates is not None:
            assert a.candidates is not None
            assert a.candidates.tolist() == b.candidates.tolist()


def test_no_forward_of_the_other_version_when_nobody_wants_both() -> None:
    shapes: list[tuple[int, ...]] = []
    theirs = _counting(_theirs(), shapes)
    out, _ = _batch(_mine(), theirs, [replace(a, both=False) for a in ASKS])
    assert shapes == [] and all(s.theirs is None for s in out)


def _got(mine: Loaded, theirs: Loaded) -> Scored:
    out, _ = _batch(mine, theirs, [Ask(None, "u1", 50, True, both=True)])
    return out[0]


def test_the_answer_interleaves_only_with_the_trials_other_version() -> None:
    mine, theirs = _mine(), _theirs()
    got = _got(mine, theirs)
    items, served, trial = answer(got, TRIAL, 6, 0.0, random.Random(1))
    assert trial is TRIAL and served.trial == "t1" and served.other == "5"
    assert {it.version for it in items} <= {3, 5} and len(items) == 6
    # the trial moved on (its other version is not the one this batch had): a plain answer
    moved = TRIAL.model_copy(update={"b": 9, "b_versions": [9]})
    items, served, trial = answer(got, moved, 6, 0.0, random.Random(1))
    assert trial is None and served.trial is None and served.version == "3"
    assert [it.item_id for it in items] == [it.item_id for it in ranked(got, 6, 0.0)]
    assert all(it.version is None for it in items)
    items, served, trial = answer(got, None, 6, 0.0, random.Random(1))  # the trial ended
    assert trial is None and served.trial is None


def test_a_broken_other_version_gets_the_serving_versions_own_answer() -> None:
    mine, theirs = _mine(), _theirs()
    real = theirs.score

    def broken(x: torch.Tensor) -> torch.Tensor:
        return real(x) * float("nan")

    got = _got(mine, replace(theirs, score=broken))
    assert got.theirs is not None and isinstance(got.theirs.result, HTTPException)
    failures = Streak(logging.getLogger(__name__), "their scores")
    items, served, trial = answer(got, TRIAL, 6, 0.0, random.Random(1), failures)
    assert trial is None and served.trial is None and served.version == "3"
    assert [it.item_id for it in items] == [it.item_id for it in ranked(got, 6, 0.0)]
    assert failures.failures == 1
    answer(_got(mine, theirs), TRIAL, 6, 0.0, random.Random(1), failures)
    assert failures.failures == 0  # working again
