"""The gate's questions: several held-out events per user, and an error clustered by user."""

from __future__ import annotations

import numpy as np
import pytest

from training.config import GateConfig
from training.data import Holdout, round_examples
from training.gate import gate
from training.metrics import PairedGap, clustered_se, paired_gap


def test_each_user_holds_out_the_last_n_new_events_but_at_most_half() -> None:
    new = {"long": [10, 11, 12, 13, 14, 15, 16, 17], "two": [20, 21], "one": [30], "lone": [40]}
    context = {"long": [1, 2], "two": [3], "one": [4]}  # "lone" has no earlier event
    ex, hold = round_examples(context, new, max_len=6, holdout=3)
    asked = {}
    for user, target in zip(hold.users, hold.targets, strict=True):
        asked.setdefault(int(user), []).append(int(target))
    # long: its last 3; two: 1 (half of 2); one: its only event (it has context); lone: none
    assert asked == {0: [15, 16, 17], 1: [21], 2: [30]}
    assert hold.n_users == 3 and len(hold) == 5
    trained = set(ex.targets[ex.targets > 0].tolist())
    assert trained == {10, 11, 12, 13, 14, 20}  # no held-out event is a target
    # Each question sees only what came before it, and excludes exactly that from ranking.
    q = list(hold.targets).index(16)
    assert hold.histories[q].tolist() == [10, 11, 12, 13, 14, 15]
    assert hold.seen[q] == {1, 2, 10, 11, 12, 13, 14, 15}


def test_one_question_per_user_is_the_old_rule() -> None:
    _, hold = round_examples({"u": [1, 2]}, {"u": [3, 4, 5, 6]}, max_len=4, holdout=1)
    assert hold.targets.tolist() == [6] and hold.n_users == 1


def test_clustered_se_is_the_plain_se_for_singletons_and_wider_for_repeats() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=200)
    plain = x.std(ddof=1) / np.sqrt(len(x))
    assert np.isclose(clustered_se(x, None), plain, rtol=1e-9)
    assert np.isclose(clustered_se(x, np.arange(200)), plain, rtol=1e-9)
    # The same 200 answers asked three times each: no more information, and the clustered
    # error says so (the naive one would shrink by sqrt(3)).
    tripled = np.repeat(x, 3)
    groups = np.repeat(np.arange(200), 3)
    assert np.isclose(clustered_se(tripled, groups), plain, rtol=1e-9)
    assert tripled.std(ddof=1) / np.sqrt(len(tripled)) < 0.6 * plain


def test_paired_gap_pairs_questions_by_event_and_reads_the_noise() -> None:
    def hold(asked: list[int], users: list[int]) -> Holdout:
        n = len(asked)
        return Holdout(np.zeros((n, 3), dtype=np.int64), np.zeros(n, dtype=np.int64), [set()] * n,
                       np.asarray(users), np.asarray(asked))  # fmt: skip

    # a was asked events 0-3, b events 1-4 (event 0 had no history b knew): events 1-3 pair up.
    a, b = hold([0, 1, 2, 3], [0, 0, 1, 2]), hold([1, 2, 3, 4], [0, 1, 2, 2])
    gap = paired_gap(np.array([5, 0, 20, 20]), a, np.array([0, 0, 0, 1]), b)
    assert gap.questions == 3
    # b - a per event: 1: both rank 0 (1.0 - 1.0); 2 and 3: b's rank 0 against a's 20 (a miss)
    assert np.isclose(gap.mean, ((1.0 - 1.0) + (1.0 - 0.0) + (1.0 - 0.0)) / 3)
    assert PairedGap(0.02, 0.005, 100).verdict() == "ahead"
    assert PairedGap(-0.02, 0.005, 100).verdict() == "behind"
    assert PairedGap(-0.002, 0.005, 100).verdict() == "within noise"
    assert paired_gap(np.array([1]), hold([7], [0]), np.array([1]), hold([8], [0])).questions == 0
    with pytest.raises(ValueError, match="which event"):
        paired_gap(np.array([1]), Holdout(np.zeros((1, 3)), np.zeros(1), [set()]), np.array([1]),
                   hold([0], [0]))  # fmt: skip


def test_min_eval_users_counts_users_not_questions() -> None:
    hist = np.tile(np.array([[0, 1, 2]]), (30, 1))
    hold = Holdout(hist, np.full(30, 3), [{1, 2}] * 30, np.repeat(np.arange(10), 3))
    result = gate(_Const(), None, hold, hold, np.ones(5), GateConfig(min_eval_users=20))
    assert not result.promote and "only 10 held-out users" in result.reason


class _Const:
    n_rows = 5

    def eval(self) -> object:
        return self

    def score(self, h: object) -> object:
        import torch

        assert isinstance(h, torch.Tensor)
        return torch.zeros(h.shape[0], self.n_rows)
