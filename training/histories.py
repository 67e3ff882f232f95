"""Per-user histories as of a version: what a round needs of the past, bounded by the round's users.

A round trains on its new events only, but each new event needs its user's earlier items as
context (the last ``max_len`` of them) and evaluation needs the set of items the user already saw
(excluded from ranking). Reading that from the buffer means scanning all history every round,
so the round's cost would grow with everything ever ingested. Instead every version carries this
index (one Parquet file: user, last ``max_len`` item rows in time order, every row ever seen), the
next round reads only its users' entries (a pushed-down filter) and writes the merged index with
its version. Rows are positions in the lineage's append-only item map, so they stay valid across
versions.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

FILE = "histories.parquet"
_SCHEMA = pa.schema(
    [
        ("user_id", pa.string()),
        ("recent", pa.list_(pa.int32())),  # last max_len item rows, oldest first
        ("seen", pa.list_(pa.int32())),  # every item row the user interacted with, sorted
    ]
)


@dataclass
class UserHistories:
    """user -> (recent rows, seen rows), for the users a round touches (or all, when saved)."""

    max_len: int
    recent: dict[str, list[int]] = field(default_factory=dict)
    seen: dict[str, set[int]] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.recent)

    @classmethod
    def from_sequences(cls, seqs: dict[str, list[int]], max_len: int) -> UserHistories:
        """From full per-user sequences (a table read from the buffer, the legacy path)."""
        return cls(
            max_len,
            {u: s[-max_len:] for u, s in seqs.items()},
            {u: set(s) for u, s in seqs.items()},
        )

    @classmethod
    def load(cls, directory: Path, users: Iterable[str] | None, max_len: int) -> UserHistories:
        """The entries of ``users`` (all when None) from a version's index."""
        filters = None
        if users is not None:
            filters = pc.field("user_id").isin(pa.array(sorted(set(users)), pa.string()))
        table = pq.read_table(directory / FILE, filters=filters)
        out = cls(max_len)
        for u, recent, seen in zip(
            table["user_id"].to_pylist(),
            table["recent"].to_pylist(),
            table["seen"].to_pylist(),
            strict=True,
        ):
            out.recent[u] = list(recent)[-max_len:]
            out.seen[u] = set(seen)
        return out

    @staticmethod
    def exists(directory: Path | None) -> bool:
        return directory is not None and (directory / FILE).exists()

    def extended(self, new: dict[str, list[int]]) -> UserHistories:
        """These histories with the new sequences appended (only the users in ``new``)."""
        out = UserHistories(self.max_len)
        for u, rows in new.items():
            out.recent[u] = (self.recent.get(u, []) + rows)[-self.max_len :]
            out.seen[u] = self.seen.get(u, set()) | set(rows)
        return out

    def save(self, directory: Path, base: Path | None) -> None:
        """Write the merged index: ``base``'s entries, replaced by ours where we have them."""
        mine = pa.table(
            {
                "user_id": pa.array(list(self.recent), pa.string()),
                "recent": pa.array(list(self.recent.values()), pa.list_(pa.int32())),
                "seen": pa.array(
                    [sorted(self.seen.get(u, set())) for u in self.recent], pa.list_(pa.int32())
                ),
            },
            schema=_SCHEMA,
        )
        if base is not None and (base / FILE).exists():
            old = pq.read_table(base / FILE)
            keep = pc.invert(pc.is_in(old["user_id"], value_set=mine["user_id"]))
            mine = pa.concat_tables([old.filter(keep).cast(_SCHEMA), mine])
        # Sorted by user so a reader's filter touches few row groups.
        pq.write_table(mine.sort_by("user_id"), directory / FILE, row_group_size=16_384)
