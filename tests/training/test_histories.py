"""The per-user history index gives a round the same examples as reading all history would."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np

from training.data import round_examples
from training.histories import UserHistories


def _random_seqs(rng: random.Random, users: int, lo: int, hi: int) -> dict[str, list[int]]:
    return {
        f"u{u}": [rng.randrange(1, 60) for _ in range(rng.randrange(lo, hi))] for u in range(users)
    }


def test_truncated_context_plus_seen_equals_full_history() -> None:
    rng = random.Random(3)
    max_len = 8
    full_ctx = _random_seqs(rng, 40, 0, 30)  # often longer than max_len
    new = _random_seqs(rng, 40, 1, 12)
    ex_full, hold_full = round_examples(full_ctx, new, max_len, holdout=True)
    idx = UserHistories.from_sequences(full_ctx, max_len)
    assert all(len(r) <= max_len for r in idx.recent.values())
    ex_idx, hold_idx = round_examples(idx.recent, new, max_len, holdout=True, seen=idx.seen)
    assert np.array_equal(ex_full.inputs, ex_idx.inputs)
    assert np.array_equal(ex_full.targets, ex_idx.targets)
    assert np.array_equal(hold_full.histories, hold_idx.histories)
    assert np.array_equal(hold_full.targets, hold_idx.targets)
    assert hold_full.seen == hold_idx.seen


def test_saved_index_merges_and_loads_only_the_asked_users(tmp_path: Path) -> None:
    v1, v2 = tmp_path / "v1", tmp_path / "v2"
    v1.mkdir()
    v2.mkdir()
    first = UserHistories(4).extended({"a": [1, 2, 3], "b": [7]})
    first.save(v1, None)
    loaded = UserHistories.load(v1, ["a"], 4)
    assert loaded.recent == {"a": [1, 2, 3]} and loaded.seen == {"a": {1, 2, 3}}
    # The next version appends a's new rows and adds c; b is carried over untouched.
    second = loaded.extended({"a": [4, 5], "c": [9]})
    second.save(v2, v1)
    everyone = UserHistories.load(v2, None, 4)
    assert everyone.recent == {"a": [2, 3, 4, 5], "b": [7], "c": [9]}
    assert everyone.seen == {"a": {1, 2, 3, 4, 5}, "b": {7}, "c": {9}}
    assert UserHistories.load(v2, ["nobody"], 4).recent == {}
    assert UserHistories.exists(v2) and not UserHistories.exists(tmp_path)
