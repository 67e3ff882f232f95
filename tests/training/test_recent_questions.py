"""The gate's recent questions: a small round's questions are topped up from earlier rounds', only
with users absent from the round, and a round too small even then still waits."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from tests.training.data_gen import synthetic_table, watermark_of
from tests.training.test_round_refusals import CFG, _as_trained
from training.config import GateConfig
from training.data import Holdout
from training.errors import RoundTooSmallError
from training.questions import RecentQuestions, user_keys
from training.registry import Registry
from training.round import run_round


def _hold(users: list[int], target0: int = 0) -> Holdout:
    n = len(users)
    hist = np.arange(1, 3 * n + 1, dtype=np.int64).reshape(n, 3)  # [Q, 3]
    targets = np.arange(target0, target0 + n, dtype=np.int64)
    return Holdout(hist, targets, [set(h.tolist()) for h in hist], np.asarray(users, np.int64))


def test_top_up_borrows_whole_users_absent_from_the_round_newest_first() -> None:
    rq = RecentQuestions(capacity=100, max_len=3)
    rq.add(_hold([1, 1, 2, 3], target0=100))  # an older round
    rq.add(_hold([4, 5, 5], target0=200))  # the latest round
    own = _hold([5, 6])  # user 5 is in this round again: never borrowed
    got, borrowed = rq.top_up(own, min_users=5)
    assert borrowed == 3 and got.n_users == 5
    assert got.users is not None
    assert got.users[:2].tolist() == [5, 6]  # the round's own questions come first, unchanged
    # Newest first: 4 (latest round), then 3 and 2; user 1 is not needed. Whole users: both of a
    # borrowed user's questions come along.
    assert sorted(set(got.users[2:].tolist())) == [2, 3, 4]
    assert got.targets[2:].tolist() == [102, 103, 200]
    assert len(got.seen) == len(got) and got.seen[2] == set(got.histories[2].tolist()) - {0}


def test_enough_users_of_its_own_borrow_nothing() -> None:
    rq = RecentQuestions(capacity=100, max_len=3)
    rq.add(_hold([1, 2, 3]))
    own = _hold([7, 8, 9])
    got, borrowed = rq.top_up(own, min_users=3)
    assert borrowed == 0 and got is own


def test_capacity_keeps_the_newest_and_survives_a_save(tmp_path: Path) -> None:
    rq = RecentQuestions(capacity=4, max_len=3)
    rq.add(_hold([1, 2, 3], target0=10))
    rq.add(_hold([4, 5], target0=20))
    assert rq.users.tolist() == [2, 3, 4, 5] and rq.targets.tolist() == [11, 12, 20, 21]
    rq.save(tmp_path)
    assert RecentQuestions.exists(tmp_path)
    back = RecentQuestions.load(tmp_path, capacity=3)  # a smaller setting keeps the newest
    assert back.users.tolist() == [3, 4, 5] and back.histories.shape == (3, 3)
    none = RecentQuestions.load(tmp_path, capacity=0)
    assert len(none) == 0 and none.top_up(_hold([9]), min_users=5)[1] == 0


def test_user_keys_are_stable_and_distinct() -> None:
    a = user_keys(["u1", "u2", "u3"])
    assert a.tolist() == user_keys(["u1", "u2", "u3"]).tolist()
    assert len(set(a.tolist())) == 3 and a.dtype == np.int64


def _later_events_of(table: pa.Table, users: list[str], offset0: int, ts0: int) -> pa.Table:
    """A few later events of ``users`` only (known items), after everything in ``table``."""
    items = table.column("item_id").to_pylist()[:5]
    rows = [(u, item) for u in users for item in items]
    cols = {name: table.column(name).to_pylist()[:1] * len(rows) for name in table.column_names}
    cols["user_id"] = [u for u, _ in rows]
    cols["item_id"] = [i for _, i in rows]
    cols["ts"] = [ts0 + i for i in range(len(rows))]
    cols["offset"] = [offset0 + i for i in range(len(rows))]
    return pa.table(cols, schema=table.schema)


def test_a_small_round_is_gated_on_borrowed_questions_of_absent_users(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _as_trained(monkeypatch, lambda init: init)
    reg = Registry(tmp_path / "reg")
    first = synthetic_table(600, seed=1)
    assert run_round(first, first.slice(0, 0), watermark_of(first), reg, CFG).version == 1
    users = sorted(set(first.column("user_id").to_pylist()))[:2]
    small = _later_events_of(
        first, users, int(max(first.column("offset").to_pylist())) + 1,
        int(max(first.column("ts").to_pylist())) + 1,
    )  # fmt: skip
    wm = watermark_of(small)
    # Without the top-up two users cannot be gated (min_eval_users=5): the round waits.
    alone = CFG.model_copy(update={"gate": GateConfig(min_eval_users=5, recent_questions=0)})
    with pytest.raises(RoundTooSmallError, match=r"2 held-out users \(\+0 from earlier"):
        run_round(small, first, wm, reg, alone)
    assert reg.versions() == [1]
    # With it, three users of v1's round who have no event in this one make up the rest.
    r = run_round(small, first, wm, reg, CFG)
    assert r.version == 2
    assert r.metrics["gate_users_own"] == 2 and r.metrics["gate_users_borrowed"] == 3
    stored = RecentQuestions.load(reg.path(2), 300)
    assert set(user_keys(users).tolist()) <= set(stored.users.tolist())  # its own are kept
