"""Every live user's most recent items, compact: what the history component holds in memory.

One Python object per item (a deque of strings per user) cost ~1.5 KB per user at 100 items
and capped the component at 200,000 users. Here item ids are interned once (an int32 code per
item of the catalog), each user owns one row of a preallocated int32 ring array (``length``
codes, written round-robin), and a dict maps a user id to its row: ~0.6 KB per user at 100 items,
with no cap unless ``max_users`` is set. The arrays grow by a quarter when full.

``load`` fills an empty store from a whole buffer read at once and ``extend`` adds a buffer's
tail (vectorised: each user's last ``length`` events land in their ring positions directly)
instead of one push per event; ``load_coded`` fills it from a version's per-user history index,
already grouped by user and coded, without a string per item.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

FIRST_ROWS = 1024
LOAD_BLOCK = 65_536  # users per block of load_coded: its temporaries stay a few MB
GROWTH = 0.25  # headroom a full store adds (a doubling left room for as many users again)
EVICT_SHARE = 0.01  # past max_users, drop this share of the least recently active at once


class HistoryStore:
    def __init__(self, length: int, max_users: int | None = None) -> None:
        if length < 1:
            raise ValueError(f"length must be at least 1, got {length}")
        self.length, self.max_users = length, max_users
        self._code: dict[str, int] = {}  # item id -> code
        self._items: list[str] = []  # code -> item id
        self._row: dict[str, int] = {}  # user id -> ring row
        self._free: list[int] = []  # rows of evicted users, reused first
        self._rings = np.zeros((FIRST_ROWS, length), dtype=np.int32)
        self._pushes = np.zeros(FIRST_ROWS, dtype=np.int64)  # items ever pushed, per row
        self._touched = np.zeros(FIRST_ROWS, dtype=np.int64)  # the clock at the last push
        self._clock = 0

    def __len__(self) -> int:
        return len(self._row)

    def nbytes(self) -> int:
        """The arrays' bytes (the dicts and strings come on top)."""
        return self._rings.nbytes + self._pushes.nbytes + self._touched.nbytes

    # -- writing ----------------------------------------------------------------------------
    def push(self, user: str, item: str) -> None:
        row = self._row.get(user)
        if row is None:
            row = self._new_row(user)
        n = int(self._pushes[row])
        self._rings[row, n % self.length] = self._intern(item)
        self._pushes[row] = n + 1
        self._clock += 1
        self._touched[row] = self._clock

    def load(self, users: pa.Array | Sequence[str], items: pa.Array | Sequence[str]) -> None:
        """Events in arrival order into an empty store, as if pushed one by one."""
        if self._row:
            raise ValueError("load fills an empty store; push into one that holds users")
        self.extend(users, items)

    def extend(self, users: pa.Array | Sequence[str], items: pa.Array | Sequence[str]) -> None:
        """Events in arrival order, as if pushed one by one, vectorised: each user's last
        ``length`` of them land in their ring positions directly."""
        u = pc.dictionary_encode(pa.array(users, pa.string()))
        i = pc.dictionary_encode(pa.array(items, pa.string()))
        if len(u) == 0:
            return
        item_code = np.array([self._intern(x) for x in i.dictionary.to_pylist()], np.int32)
        names = u.dictionary.to_pylist()
        # Grown once for the users it lacks (rows of evicted users are reused first), not by a
        # doubling each time a new user finds the arrays full: a load copies them once.
        self._grow(len(self._row) + sum(1 for x in names if x not in self._row))
        user_row = np.array([self._add_row(x) for x in names], np.int64)
        event_row = user_row[u.indices.to_numpy(zero_copy_only=False)]
        order = np.argsort(event_row, kind="stable")  # each user's events together, in order
        grouped = event_row[order]
        starts = np.flatnonzero(np.r_[True, grouped[1:] != grouped[:-1]])
        sizes = np.diff(np.r_[starts, len(grouped)])
        rows = grouped[starts]
        position = np.arange(len(grouped)) - np.repeat(starts, sizes)  # index within its user
        icode = item_code[i.indices.to_numpy(zero_copy_only=False)]
        pushed = np.repeat(self._pushes[rows], sizes) + position  # its count before it
        self._write_last(grouped, position, np.repeat(sizes, sizes), pushed, icode[order])
        self._pushes[rows] += sizes
        self._touched[rows] = self._clock + order[starts + sizes - 1] + 1  # the user's last event
        self._clock += len(grouped)
        self._evict_over_cap()
        # Arrow's allocator keeps what the encoding freed (hundreds of MB at 100M events).
        pa.default_memory_pool().release_unused()

    def load_coded(
        self, users: pa.Array, offsets: np.ndarray, codes: np.ndarray, items: list[str]
    ) -> None:
        """Per-user histories into an empty store: user ``j``'s items, oldest first, are
        ``items[c]`` for ``c`` in ``codes[offsets[j]:offsets[j + 1]]`` (code 0 unused); each
        keeps its last ``length``. No string per item and no sort: a 1M-user index loads in
        ``LOAD_BLOCK``-user blocks. Users count as active in their given order."""
        if self._row:
            raise ValueError("load_coded fills an empty store; push into one that holds users")
        n = len(users)
        self._items = list(items)
        self._code = {it: c for c, it in enumerate(self._items)}
        self._grow(n)
        sizes = np.diff(offsets)
        for a in range(0, n, LOAD_BLOCK):
            b = min(n, a + LOAD_BLOCK)
            rows = np.repeat(np.arange(a, b), sizes[a:b])
            position = np.arange(offsets[a], offsets[b]) - offsets[rows]
            self._write_last(rows, position, sizes[rows], position, codes[offsets[a] : offsets[b]])
        self._pushes[:n] = sizes
        self._touched[:n] = np.arange(1, n + 1)
        self._clock = n
        self._row = dict(zip(users.to_pylist(), range(n), strict=True))
        self._evict_over_cap()

    def _write_last(
        self,
        rows: np.ndarray,
        position: np.ndarray,
        size: np.ndarray,
        count: np.ndarray,
        codes: np.ndarray,
    ) -> None:
        """Events grouped by user into their rings: event ``j`` is the ``position[j]``-th of the
        ``size[j]`` its user ``rows[j]`` gets here, and the user's ``count[j]``-th push ever; only
        each user's last ``length`` are written, each where a push would have put it."""
        keep = position >= size - self.length
        self._rings[rows[keep], count[keep] % self.length] = codes[keep]

    def _intern(self, item: str) -> int:
        code = self._code.get(item)
        if code is None:
            code = self._code[item] = len(self._items)
            self._items.append(item)
        return code

    def _add_row(self, user: str) -> int:
        """``user``'s row, a new one if the store lacks the user (no eviction here: a batch's
        rows must all stay until it is written)."""
        row = self._row.get(user)
        if row is None:
            row = self._free.pop() if self._free else len(self._row)
            self._grow(row + 1)
            self._row[user] = row
            self._pushes[row] = 0
        return row

    def _new_row(self, user: str) -> int:
        row = self._add_row(user)
        self._evict_over_cap(keep=row)
        return row

    def _grow(self, rows: int) -> None:
        have = len(self._pushes)
        if rows <= have:
            return
        # By a share, not a doubling: each growth copies the arrays, but a store of 1M users
        # that a rebuild's tail or a new user pushes past its size would otherwise hold room
        # for 2M. A geometric share still keeps the copies amortised O(1) per row.
        new = max(rows, have + int(GROWTH * have))
        self._rings = np.concatenate(
            [self._rings, np.zeros((new - have, self.length), dtype=np.int32)]
        )
        self._pushes = np.concatenate([self._pushes, np.zeros(new - have, dtype=np.int64)])
        self._touched = np.concatenate([self._touched, np.zeros(new - have, dtype=np.int64)])

    def _evict_over_cap(self, keep: int = -1) -> None:
        """Past ``max_users``, drop the least recently active (a share at once, so eviction is
        not paid on every new user); ``keep`` (the row being added) is never one of them."""
        if self.max_users is None or len(self._row) <= self.max_users:
            return
        n = max(1, len(self._row) - self.max_users, int(EVICT_SHARE * self.max_users))
        users = [u for u, r in self._row.items() if r != keep]
        rows = np.fromiter((self._row[u] for u in users), dtype=np.int64, count=len(users))
        n = min(n, len(users))
        oldest = np.argpartition(self._touched[rows], n - 1)[:n]
        for j in oldest.tolist():
            self._free.append(self._row.pop(users[j]))

    # -- reading ----------------------------------------------------------------------------
    def get(self, user: str) -> list[str]:
        """The user's items, oldest first ([] for a user the store does not hold)."""
        row = self._row.get(user)
        if row is None:
            return []
        n = int(self._pushes[row])
        ring = self._rings[row]
        if n <= self.length:
            codes = ring[:n]
        else:
            k = n % self.length
            codes = np.concatenate([ring[k:], ring[:k]])
        items = self._items
        return [items[c] for c in codes.tolist()]
