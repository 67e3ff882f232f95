"""A live trial's pieces without a cluster: the interleaved answer a replica builds from two
versions, and how the click side turns an interleaved impression into one outcome."""

from __future__ import annotations

import asyncio
import random

import pytest
import torch

from serving.clicks import EARLY_S, SETTLE_S, ClickBook, Served
from serving.live_answer import interleave, other_version, ranked
from serving.live_trial import add_counts, join_lineage
from serving.scoring import Ask, Loaded, Scored, as_loaded, score_asks
from training.config import ModelConfig
from training.model import Recommender
from training.registry import LiveTrial
from training.sequential import SequentialConfig, log_lr
from training.vocab import ItemVocab

ITEMS = [f"i{n}" for n in range(1, 60)]


def _version(v: int, seed: int, items: list[str] = ITEMS) -> Loaded:
    """A small random version over ``items``, ready to serve."""
    torch.manual_seed(seed)
    cfg = ModelConfig(max_len=8, d_model=16, n_layers=1, n_heads=2, text_init=False)
    vocab = ItemVocab(items)
    model = Recommender(cfg, len(vocab))
    model.eval()
    return as_loaded(v, model, vocab, torch.arange(len(vocab), dtype=torch.float32))


async def _no_histories(users: list[str]) -> list[list[str]]:
    return [[] for _ in users]


def _scored(m: Loaded, history: list[str], k: int) -> Scored:
    ask = Ask(history, None, max(k * 5, 50), exclude_seen=True)
    return asyncio.run(score_asks(m, [ask], _no_histories))[0]


TRIAL = LiveTrial(id="t1", mode="canary", a=3, b=5, b_versions=[5], share=1.0)


def test_a_replica_plays_the_version_it_serves_against_the_other() -> None:
    assert other_version(TRIAL, 3) == 5  # serving a: load b's newest
    assert other_version(TRIAL, 5) == 3
    assert other_version(TRIAL, 9) == 3  # a newer serving version plays b against a


@pytest.mark.parametrize("diversity", [0.0, 0.5])
def test_interleaved_answer_keeps_k_exclusion_and_each_versions_own_order(
    diversity: float,
) -> None:
    a, b = _version(3, 0), _version(5, 1)
    history = ITEMS[:6]
    k = 10
    got_a, got_b = _scored(a, history, k), _scored(b, history, k)
    answer, served = interleave(TRIAL, got_b, got_a, k, diversity, random.Random(7))
    ids = [it.item_id for it in answer]
    assert len(ids) == k == len(set(ids))
    assert not set(ids) & set(history)  # seen items stay excluded
    assert served.trial == "t1" and served.version == "3" and served.other == "5"
    assert served.items == ids and len(served.teams) == k
    own = {"a": [i.item_id for i in ranked(got_a, k, diversity)],
           "b": [i.item_id for i in ranked(got_b, k, diversity)]}  # fmt: skip
    for team, version in (("a", 3), ("b", 5)):
        mine = [it for it, t in zip(answer, served.teams, strict=True) if t == team]
        assert all(it.version == version for it in mine)
        # each team's items appear in that version's own order, each from its own top k
        positions = [own[team].index(it.item_id) for it in mine]
        assert positions == sorted(positions)
    counts = {t: served.teams.count(t) for t in "ab"}
    assert abs(counts["a"] - counts["b"]) <= 1  # team draft keeps the teams even
    shared = [it for it, t in zip(answer, served.teams, strict=True) if t == "="]
    assert all(it.version is None for it in shared)


def test_two_versions_that_rank_alike_answer_with_shared_picks_only() -> None:
    a, b = _version(3, 0), _version(5, 0)  # the same weights, two versions
    got_a, got_b = _scored(a, ITEMS[:6], 10), _scored(b, ITEMS[:6], 10)
    answer, served = interleave(TRIAL, got_a, got_b, 10, 0.0, random.Random(7))
    assert served.teams == "=" * 10
    assert [it.item_id for it in answer] == [it.item_id for it in ranked(got_a, 10, 0.0)]
    assert all(it.version is None for it in answer)


def test_the_plain_answer_names_no_version_per_item() -> None:
    got = _scored(_version(3, 0), ITEMS[:3], 5)
    assert all(it.version is None for it in ranked(got, 5, 0.0))


def _interleaved(items: str, teams: str, trial: str = "t1") -> Served:
    return Served(list(items), "3", trial, teams, "5")


def test_an_impression_settles_once_into_team_drafts_outcome() -> None:
    book = ClickBook()
    book.record_served({"u": _interleaved("xyzw", "abab"), "v": _interleaved("xyzw", "abab"),
                        "w": _interleaved("xyzw", "baab")}, now=0.0)  # fmt: skip
    book.on_event("u", "y", "click", now=1.0)  # b's item
    book.on_event("v", "x", "purchase", now=1.0)  # a's, and b's: a tie
    book.on_event("v", "y", "click", now=2.0)
    # per-version click-through credits the contributing version
    assert book.totals(["3", "5"]) == {"3": (6, 1), "5": (6, 2)}
    assert book.trial_counts("t1", now=1.0) == [0, 0, 0, 0, 0]  # nothing settled yet
    book.record_served({"u": Served(["q"], "3")}, now=5.0)  # u moved on: settled
    assert book.trial_counts("t1", now=5.0) == [0, 1, 0, 0, 1]  # b won, by one click on its item
    book.on_event("u", "w", "click", now=6.0)  # u's old answer is gone: no effect
    book.on_event("v", "z", "click", now=6.0)  # v's is still open: a leads 2-1
    # v: a 2-1; w: no click: tie. Credited clicks: a's 2 (v), b's 2 (u and v).
    assert book.trial_counts("t1", now=SETTLE_S + 1) == [1, 1, 1, 2, 2]
    assert book.trial_counts("t1", now=SETTLE_S + 2) == [1, 1, 1, 2, 2]  # counted once
    assert book.trial_counts("other", now=SETTLE_S + 2) == [0, 0, 0, 0, 0]


def test_a_click_on_a_shared_pick_credits_neither_version() -> None:
    book = ClickBook()
    book.record_served({"u": _interleaved("xyz", "=ab"), "v": _interleaved("xyz", "=ab")}, now=0)
    book.on_event("u", "x", "click", now=1.0)  # shared: a tie, no credited click
    book.on_event("v", "x", "click", now=1.0)
    book.on_event("v", "z", "click", now=1.0)  # b's
    assert book.trial_counts("t1", now=SETTLE_S + 1) == [0, 1, 1, 0, 1]
    # both versions showed x: it counts in both click-throughs (3 items and 2 clicks each)
    assert book.totals(["3", "5"]) == {"3": (4, 2), "5": (4, 3)}


def test_plain_answers_never_count_in_a_trial() -> None:
    book = ClickBook()
    book.record_served({"u": Served(["x", "y"], "3")}, now=0.0)
    book.on_event("u", "x", "click", now=1.0)
    book.record_served({"u": Served(["z"], "3")}, now=2.0)
    assert book.trials == {}


def test_shard_counts_add_only_what_is_new_and_survive_a_shard_restart() -> None:
    trial = TRIAL.model_copy(deep=True)
    cfg = SequentialConfig()
    assert add_counts(trial, {"0": [2, 1, 5, 3, 1], "1": [0, 3, 1, 0, 4]}, cfg)
    assert (trial.test.losses, trial.test.wins, trial.test.ties) == (2, 4, 6)
    assert (trial.a_clicks, trial.b_clicks) == (3, 5)
    assert not add_counts(trial, {"0": [2, 1, 5, 3, 1], "1": [0, 3, 1, 0, 4]}, cfg)  # none new
    # shard 1 restarted (its totals went down): what it has now is all new
    assert add_counts(trial, {"0": [3, 1, 5, 4, 1], "1": [0, 1, 0, 0, 1]}, cfg)
    assert (trial.test.losses, trial.test.wins, trial.test.ties) == (3, 5, 6)
    assert (trial.a_clicks, trial.b_clicks) == (4, 6)


def test_a_shard_that_counts_outcomes_only_still_adds_them() -> None:
    """A shard of a release before credited clicks (three counts), and a trial recorded then."""
    trial = TRIAL.model_copy(deep=True)
    trial.counted = {"0": [1, 1, 1]}
    assert add_counts(trial, {"0": [2, 1, 5]}, SequentialConfig())
    assert (trial.test.losses, trial.test.wins, trial.test.ties) == (1, 0, 4)
    assert (trial.a_clicks, trial.b_clicks) == (0, 0) and trial.counted["0"] == [2, 1, 5, 0, 0]


def test_b_s_lineage_pools_each_newer_version_once() -> None:
    trial = TRIAL.model_copy(deep=True)
    for v in (6, 6, 9):
        join_lineage(trial, v)
    assert trial.b == 9 and trial.b_versions == [5, 6, 9]


def test_a_losing_streak_decides_b_worse_at_alpha() -> None:
    trial = TRIAL.model_copy(deep=True)
    cfg = SequentialConfig()
    for n in range(1, 100):
        add_counts(trial, {"0": [n, 0, 0]}, cfg)
        if trial.test.decision != "continue":
            break
    # the first losing streak whose likelihood ratio reaches 1/alpha (28 with the default prior)
    first = next(n for n in range(1, 100) if log_lr(0, n, cfg) >= cfg.threshold)
    assert trial.test.decision == "b_worse" and trial.test.decided_at == first


def test_a_click_that_arrives_before_the_served_report_is_credited_when_it_comes() -> None:
    book = ClickBook()
    book.on_event("u", "y", "click", now=10.0)  # the replica's report is still on its way
    book.on_event("w", "x", "click", now=10.0)
    book.record_served({"u": _interleaved("xyzw", "abab")}, now=10.4)
    assert book.totals(["5"]) == {"5": (2, 1)}  # y was b's
    assert book.trial_counts("t1", now=10.4 + SETTLE_S + 1) == [0, 1, 0, 0, 1]
    # held no longer than EARLY_S: w's click is let go, not credited to a later answer
    book.record_served({"w": _interleaved("xyzw", "abab")}, now=10.0 + EARLY_S + 1)
    assert book.totals(["3"])["3"][1] == 0 and "w" not in book.early
