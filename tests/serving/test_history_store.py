"""The compact history store against the plain structure it replaces (a deque per user)."""

from __future__ import annotations

from collections import defaultdict, deque

import numpy as np
import pyarrow as pa
from hypothesis import given, settings
from hypothesis import strategies as st

from serving.history_store import HistoryStore

USERS = st.sampled_from([f"u{i}" for i in range(12)])
ITEMS = st.sampled_from([f"i{i}" for i in range(30)])
events = st.lists(st.tuples(USERS, ITEMS), max_size=300)


def _reference(evs: list[tuple[str, str]], length: int) -> dict[str, list[str]]:
    ref: dict[str, deque[str]] = defaultdict(lambda: deque(maxlen=length))
    for u, i in evs:
        ref[u].append(i)
    return {u: list(h) for u, h in ref.items()}


@settings(max_examples=150, deadline=None)
@given(evs=events, length=st.integers(1, 7), split=st.integers(0, 300))
def test_push_and_load_keep_each_users_last_items(
    evs: list[tuple[str, str]], length: int, split: int
) -> None:
    ref = _reference(evs, length)
    pushed = HistoryStore(length)
    for u, i in evs:
        pushed.push(u, i)
    loaded = HistoryStore(length)  # a bulk load, then pushes on top
    head, tail = evs[:split], evs[split:]
    loaded.load([u for u, _ in head], [i for _, i in head])
    for u, i in tail:
        loaded.push(u, i)
    for store in (pushed, loaded):
        assert len(store) == len(ref)
        for u in [f"u{i}" for i in range(12)]:
            assert store.get(u) == ref.get(u, [])


@settings(max_examples=150, deadline=None)
@given(evs=events, length=st.integers(1, 7), kept=st.integers(1, 9), cuts=st.tuples(
    st.integers(0, 300), st.integers(0, 300)))  # fmt: skip
def test_an_index_then_tails_keep_each_users_last_items(
    evs: list[tuple[str, str]], length: int, kept: int, cuts: tuple[int, int]
) -> None:
    """A version's index (each user's last ``kept`` items, grouped and coded, as serving shards
    read it), then a tail extended at once, then pushes: the same as every event pushed, with
    each user's history starting from what the index kept."""
    a, b = sorted(cuts)
    index = _reference(evs[:a], kept)
    catalog = sorted({i for _, i in evs})
    code = {item: c for c, item in enumerate(catalog, start=1)}  # 0: padding, as vocab rows
    users = sorted(index)
    offsets = np.cumsum([0, *(len(index[u]) for u in users)])
    codes = np.array([code[i] for u in users for i in index[u]], np.int32)
    store = HistoryStore(length)
    store.load_coded(pa.array(users, pa.string()), offsets, codes, ["", *catalog])
    store.extend([u for u, _ in evs[a:b]], [i for _, i in evs[a:b]])
    for u, i in evs[b:]:
        store.push(u, i)
    ref = _reference([(u, i) for u in users for i in index[u]] + evs[a:], length)
    assert len(store) == len(ref)
    for u in [f"u{i}" for i in range(12)]:
        assert store.get(u) == ref.get(u, [])


@settings(max_examples=100, deadline=None)
@given(evs=events, cap=st.integers(1, 6), batch=st.integers(1, 40))
def test_a_capped_store_extended_in_batches_holds_at_most_the_cap(
    evs: list[tuple[str, str]], cap: int, batch: int
) -> None:
    ref = _reference(evs, 4)
    store = HistoryStore(4, max_users=cap)
    for k in range(0, len(evs), batch):
        part = evs[k : k + batch]
        store.extend([u for u, _ in part], [i for _, i in part])
        assert len(store) <= cap
    for u in [f"u{i}" for i in range(12)]:
        got = store.get(u)  # the tail of its history since it was last let in
        assert got == ref[u][len(ref[u]) - len(got) :] if got else True


@settings(max_examples=100, deadline=None)
@given(evs=events, cap=st.integers(1, 6))
def test_a_cap_keeps_the_most_recently_active(evs: list[tuple[str, str]], cap: int) -> None:
    ref = _reference(evs, 4)
    store = HistoryStore(4, max_users=cap)
    for u, i in evs:
        store.push(u, i)
        assert len(store) <= cap and store.get(u)[-1] == i  # the active user is always held
    for u in [f"u{i}" for i in range(12)]:
        # Whoever is held has the tail of its history since it was last let in (an evicted
        # user starts over, as it did with the deque per user).
        got = store.get(u)
        assert got == ref[u][len(ref[u]) - len(got) :] if got else True


def test_the_arrays_cost_about_four_bytes_per_item_kept() -> None:
    """length x 4 bytes per user plus 16 (its push count and clock): ~416 bytes at 100 items."""
    store = HistoryStore(100)
    users = [f"u{k}" for k in range(20_000)]
    store.load(users * 3, [f"i{k % 500}" for k in range(60_000)])
    assert len(store) == 20_000 and store.get("u7") == ["i7", "i7", "i7"]
    assert store.nbytes() / len(store) < 1.3 * 416  # at most a quarter of headroom


def test_a_tail_with_new_users_after_a_load_grows_by_a_share() -> None:
    """A rebuild loads the index, then its tail adds a few users: the arrays grow by a quarter,
    not to twice the users held."""
    store = HistoryStore(10)
    n = 40_000
    users = pa.array([f"u{k}" for k in range(n)])
    store.load_coded(users, np.arange(n + 1), np.ones(n, dtype=np.int32), ["", "i1"])
    before = store.nbytes()
    store.extend(["new-1", "new-2", "u3"], ["i2", "i3", "i4"])
    assert len(store) == n + 2 and store.get("u3") == ["i1", "i4"]
    assert store.nbytes() <= 1.26 * before
    for k in range(3, 200):  # live pushes of new users reuse that room: no copy per user
        store.push(f"new-{k}", "i5")
    assert store.nbytes() <= 1.26 * before
