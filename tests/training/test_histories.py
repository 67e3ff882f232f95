"""The per-user history index gives a round the same examples as reading all history would."""

from __future__ import annotations

import itertools
import random
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from training import histories
from training.data import round_examples
from training.errors import HistoriesError
from training.histories import UserHistories
from training.vocab import ItemVocab


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


# -- the chain of parts: the same entries as the single merged file, a round's bytes -----------


def _merged(
    older: dict[str, tuple[list[int], set[int]]], new: dict[str, list[int]], n: int
) -> None:
    """The old semantics: one merged index, the round's users' entries replaced."""
    for u, rows in new.items():
        recent, seen = older.get(u, ([], set()))
        older[u] = ((recent + rows)[-n:], seen | set(rows))


def _round(base: Path | None, d: Path, new: dict[str, list[int]], max_len: int) -> None:
    """What a round does: its users' entries from the base, extended, saved after the base."""
    d.mkdir()
    have = UserHistories.load(base, new, max_len) if UserHistories.exists(base) else None
    assert base is None or have is not None
    (have or UserHistories(max_len)).extended(new).save(d, base)


rounds = st.lists(
    st.dictionaries(
        st.sampled_from([f"u{i}" for i in range(30)]),
        st.lists(st.integers(1, 50), min_size=1, max_size=6),
        min_size=1,
        max_size=30,
    ),
    min_size=1,
    max_size=12,
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rounds=rounds, legacy=st.booleans(), ask=st.sets(st.sampled_from(["u1", "u7", "x"])))
def test_a_chain_of_rounds_reads_as_the_merged_index(
    rounds: list[dict[str, list[int]]], legacy: bool, ask: set[str]
) -> None:
    max_len = 4
    want: dict[str, tuple[list[int], set[int]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        base: Path | None = None
        if legacy:  # a version written before the chain: one full file
            base = Path(tmp) / "legacy"
            base.mkdir()
            old = UserHistories(max_len).extended({"u1": [3, 4], "old": [9]})
            pq.write_table(old.table(), base / histories.FILE)
            _merged(want, {"u1": [3, 4], "old": [9]}, max_len)
        for i, new in enumerate(rounds):
            d = Path(tmp) / f"v{i}"
            _round(base, d, new, max_len)
            _merged(want, new, max_len)
            got = UserHistories.load(d, None, max_len)
            assert got.recent == {u: r for u, (r, _) in want.items()}
            assert got.seen == {u: s for u, (_, s) in want.items()}
            some = UserHistories.load(d, ask, max_len)
            assert some.recent == {u: want[u][0] for u in ask if u in want}
            assert (d / histories.MANIFEST).exists() and not (d / histories.FILE).exists()
            base = d


def _new_bytes(base: Path, d: Path) -> int:
    """Bytes of ``d``'s files that are not links of ``base``'s (written by this version)."""
    old = {p.stat().st_ino for p in base.rglob("*") if p.is_file()}
    return sum(p.stat().st_size for p in d.rglob("*") if p.is_file() and p.stat().st_ino not in old)


@pytest.mark.parametrize("total", [2_000, 40_000])
def test_a_round_writes_its_users_entries_not_everyones(tmp_path: Path, total: int) -> None:
    rng = random.Random(5)
    everyone = {f"u{i}": [rng.randrange(1, 500) for _ in range(6)] for i in range(total)}
    _round(None, tmp_path / "v0", everyone, 8)
    snapshot = sum(p.stat().st_size for p in (tmp_path / "v0").rglob("*") if p.is_file())
    base, written = tmp_path / "v0", []
    for r in range(1, 6):  # rounds of 50 users, some new, some known
        new = {f"u{rng.randrange(total + 100)}": [rng.randrange(1, 500)] for _ in range(50)}
        d = tmp_path / f"v{r}"
        _round(base, d, new, 8)
        written.append(_new_bytes(base, d))
        base = d
    # Each round wrote its own users' entries (and merged small deltas): a few KB whatever the
    # total, against a snapshot that grows with every user.
    assert max(written) < 12_000, written
    assert total < 10_000 or snapshot > 20 * max(written), (snapshot, written)
    assert len(UserHistories.load(base, None, 8)) >= total


def test_deltas_merge_and_compact_within_the_bounds(tmp_path: Path) -> None:
    rng = random.Random(2)
    base: Path | None = None
    for r in range(40):
        new = {f"u{rng.randrange(400)}": [r + 1] for _ in range(10)}
        d = tmp_path / f"v{r}"
        _round(base, d, new, 4)
        chain = histories._chain(d)
        assert chain is not None and chain[0].snapshot
        assert not any(p.snapshot for p in chain[1:])
        rows = [p.rows for p in chain[1:]]
        assert all(a >= 2 * b for a, b in itertools.pairwise(rows)), rows
        assert sum(rows) <= histories.SNAPSHOT_SHARE * chain[0].rows
        base = d


def test_item_histories_maps_rows_to_item_ids(tmp_path: Path) -> None:
    d = tmp_path / "v1"
    _round(None, d, {"a": [1, 2, 3], "b": [3]}, 2)
    _round(d, tmp_path / "v2", {"b": [1]}, 2)
    t = histories.item_histories(tmp_path / "v2", ItemVocab(["x", "y", "z"]))
    assert t.schema.field("recent").type == pa.list_(pa.string())
    assert dict(zip(t["user_id"].to_pylist(), t["recent"].to_pylist(), strict=True)) == {
        "a": ["y", "z"],
        "b": ["z", "x"],
    }
    with pytest.raises(HistoriesError):
        histories.item_histories(tmp_path, ItemVocab())


def test_a_large_index_is_read_one_row_group_at_a_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Entries of users spread over many row groups are the same as a whole read filtered; row
    groups whose user range holds none of them are not read at all."""
    users = 40_000  # three row groups of the parts' 16,384 rows
    seqs = {f"u{u:06d}": [u % 50 + 1, u % 7 + 1] for u in range(users)}
    UserHistories(4).extended(seqs).save(tmp_path, None)
    whole = histories.read_table(tmp_path)
    reads: list[int] = []
    real = pq.ParquetFile.read_row_group

    def counting(self: pq.ParquetFile, i: int, *args: object, **kwargs: object) -> pa.Table:
        reads.append(i)
        return real(self, i, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(pq.ParquetFile, "read_row_group", counting)
    spread = ["u000003", "u020000", "u039999", "nobody"]
    got = histories.read_table(tmp_path, spread)
    want = whole.filter(pa.compute.is_in(whole["user_id"], value_set=pa.array(spread)))
    assert got.sort_by("user_id").equals(want.sort_by("user_id"))
    assert got.num_rows == 3 and sorted(set(reads)) == [0, 1, 2]
    reads.clear()
    assert histories.read_table(tmp_path, ["u000001", "u000002"]).num_rows == 2
    assert reads == [0]  # the other row groups' ranges hold neither user
    reads.clear()
    assert histories.read_table(tmp_path, ["zzz"]).num_rows == 0 and reads == []
