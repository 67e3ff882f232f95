"""Per-user histories as of a version: what a round needs of the past, bounded by the round's users.

A round trains on its new events only, but each new event needs its user's earlier items as
context (the last ``max_len`` of them) and evaluation needs the set of items the user already saw
(excluded from ranking). Reading that from the buffer means scanning all history every round,
so the round's cost would grow with everything ever ingested. Instead every version carries this
index (per user: last ``max_len`` item rows in time order, every row ever seen), the next round
reads only its users' entries (a pushed-down filter) and its version adds the entries it changed.
Rows are positions in the lineage's append-only item map, so they stay valid across versions.

The index is a chain of Parquet parts, oldest first (``histories.json`` lists them): a snapshot
of every user, then deltas holding whole entries of the users later rounds touched; a user's
newest entry wins. A version writes one delta of its own round's users (merged with the newest
deltas while they are small, see ``_plan``), or, once the deltas have grown too large against the
snapshot, one fresh snapshot. Parts are shared files (``training.registry_shared``): immutable,
named by content, carried from version to version without writing them again. A version written
before the chain existed has one full ``histories.parquet``; it is still read, and the next
version compacts it into a snapshot.
"""

from __future__ import annotations

import bisect
import json
import uuid
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from training.errors import HistoriesError
from training.registry_shared import link, share
from training.vocab import ItemVocab

MANIFEST = "histories.json"
FILE = "histories.parquet"  # a single full index, as versions written before the chain hold it
_SCHEMA = pa.schema(
    [
        ("user_id", pa.string()),
        ("recent", pa.list_(pa.int32())),  # last max_len item rows, oldest first
        ("seen", pa.list_(pa.int32())),  # every item row the user interacted with, sorted
    ]
)
# Bounds. A snapshot of S rows is rewritten once the deltas hold over SNAPSHOT_SHARE * S rows, so
# a rewrite follows at least S/2 delta rows (each round's rows are written ~2 more times,
# amortised) and a full read scans at most 1.5 * S rows. A delta absorbs the ones before it while
# they are under MERGE_FACTOR times its size (a binary counter), so each part is over twice the
# next: a chain has at most log2(S) + 2 parts to open, and a row is merged at most log2(S / round
# users) times before the next snapshot, i.e. bytes per round ~ round users * log, never S.
SNAPSHOT_SHARE = 0.5
MERGE_FACTOR = 2


@dataclass(frozen=True)
class Part:
    name: str  # a shared file of the version's directory
    rows: int
    snapshot: bool


def _chain(directory: Path) -> list[Part] | None:
    """The version's parts, oldest first; None if it has no chain (older or no index)."""
    path = directory / MANIFEST
    if not path.exists():
        return None
    return [Part(**p) for p in json.loads(path.read_text())["parts"]]


def exists(directory: Path | None) -> bool:
    """Whether a version's directory holds a history index (a chain or an older full file)."""
    return directory is not None and (
        (directory / MANIFEST).exists() or (directory / FILE).exists()
    )


def _newest(tables: list[pa.Table], schema: pa.Schema = _SCHEMA) -> pa.Table:
    """One entry per user from tables ordered newest first: the first table's wins."""
    out: list[pa.Table] = []
    have = pa.array([], pa.string())
    for t in tables:
        t = t.select(schema.names).cast(schema)
        if len(have) and t.num_rows:
            t = t.filter(pc.invert(pc.is_in(t["user_id"], value_set=have)))
        out.append(t)
        have = pa.concat_arrays([have, t["user_id"].combine_chunks()])
    return pa.concat_tables(out) if out else schema.empty_table()


def _read(path: Path, users: Iterable[str] | None, columns: list[str] | None = None) -> pa.Table:
    """A part's entries of ``users`` (all when None), one row group at a time: a round's users
    are spread over every row group of a large index, so a pushed-down filter read all of it
    at once before filtering (at 1M users the round's largest allocation, kept by Arrow's memory
    pool afterwards). Row groups whose user range holds none of ``users`` are skipped unread."""
    if users is None:
        return pq.read_table(path, columns=columns)
    wanted = sorted(set(users))
    value_set = pa.array(wanted, pa.string())
    pf = pq.ParquetFile(path)
    leaf = next(j for j in range(pf.metadata.num_columns)
                if pf.metadata.schema.column(j).path == "user_id")  # fmt: skip
    parts = []
    for i in range(pf.metadata.num_row_groups):
        stats = pf.metadata.row_group(i).column(leaf).statistics
        if stats is not None and stats.has_min_max:
            first = bisect.bisect_left(wanted, stats.min)
            if first == len(wanted) or wanted[first] > stats.max:
                continue
        group = pf.read_row_group(i, columns=columns)
        parts.append(group.filter(pc.is_in(group["user_id"], value_set=value_set)))
    if parts:
        return pa.concat_tables(parts)
    schema = pf.schema_arrow
    if columns is not None:
        schema = pa.schema([schema.field(c) for c in columns])
    return schema.empty_table()


def read_table(
    directory: Path, users: Iterable[str] | None = None, columns: list[str] | None = None
) -> pa.Table:
    """Columns user_id, recent, seen (or ``columns``, user_id among them): the newest entry of
    each of ``users`` (all when None)."""
    users = None if users is None else sorted(set(users))
    schema = _SCHEMA if columns is None else pa.schema([_SCHEMA.field(c) for c in columns])
    chain = _chain(directory)
    if chain is None:
        if not (directory / FILE).exists():
            raise HistoriesError(f"{directory} holds no history index")
        return _newest([_read(directory / FILE, users, columns)], schema)
    return _newest([_read(directory / p.name, users, columns) for p in reversed(chain)], schema)


@dataclass(frozen=True)
class CodedHistories:
    """Every user's recent items as codes into ``items``, oldest first: user ``j``'s are
    ``codes[offsets[j]:offsets[j + 1]]``. Code 0 is padding (never in a history). No string per
    item: at 1M users a string per item was most of a serving shard's rebuild memory."""

    users: pa.Array  # string, one per user
    offsets: np.ndarray  # int64, len(users) + 1
    codes: np.ndarray  # int32
    items: list[str]  # code -> item id


def coded_histories(
    directory: Path, vocab: ItemVocab, keep: Callable[[pa.Array], pa.Array] | None = None
) -> CodedHistories:
    """The recent items of the version in ``directory`` as codes (vocab rows); ``keep``: a mask
    of the users wanted, given the user ids (e.g. one serving shard's)."""
    table = read_table(directory, columns=["user_id", "recent"])
    if keep is not None:
        table = table.filter(keep(table["user_id"].combine_chunks()))
    recent = table["recent"].combine_chunks()
    offsets = recent.offsets.to_numpy().astype(np.int64)
    codes = pc.list_flatten(recent).to_numpy(zero_copy_only=False).astype(np.int32, copy=False)
    return CodedHistories(table["user_id"].combine_chunks(), offsets - offsets[0], codes,
                          ["", *vocab.items()])  # fmt: skip


def item_histories(
    directory: Path, vocab: ItemVocab, keep: Callable[[pa.Array], pa.Array] | None = None
) -> pa.Table:
    """Every user's recent items as item ids: columns user_id (string) and recent
    (list<string>, oldest first), as of the version in ``directory``; ``keep`` as in
    ``coded_histories``."""
    c = coded_histories(directory, vocab, keep)
    ids = pa.array(c.items, pa.string()).take(pa.array(c.codes))
    items = pa.ListArray.from_arrays(pa.array(c.offsets, pa.int32()), ids)
    return pa.table({"user_id": c.users, "recent": items})


def _write_part(table: pa.Table, directory: Path, snapshot: bool) -> Part:
    tmp = directory / f".histories-{uuid.uuid4().hex}.parquet"
    # Sorted by user so a reader's filter touches few row groups.
    pq.write_table(table.sort_by("user_id"), tmp, row_group_size=16_384)
    return Part(share(tmp, directory), table.num_rows, snapshot)


def _plan(chain: list[Part], rows: int) -> tuple[int, bool]:
    """How many of the newest deltas a new delta of ``rows`` rows absorbs, and whether the
    version writes a fresh snapshot instead (see the bounds above)."""
    deltas = chain[1:]
    absorb, size = 0, rows
    while absorb < len(deltas) and deltas[-1 - absorb].rows < MERGE_FACTOR * size:
        size += deltas[-1 - absorb].rows
        absorb += 1
    total = rows + sum(p.rows for p in deltas)
    return absorb, total > SNAPSHOT_SHARE * chain[0].rows


def save_chain(mine: pa.Table, directory: Path, base: Path | None) -> list[Part]:
    """Write ``mine`` (whole entries of the round's users) as ``directory``'s index continuing
    ``base``'s; returns the chain written. Bytes written scale with ``mine``, except when the
    chain is compacted into a snapshot (see the bounds above)."""
    chain = _chain(base) if base is not None else None
    if chain is None:  # no chain to continue: mine, over an older full index if there is one
        older = [pq.read_table(base / FILE)] if base is not None and exists(base) else []
        parts = [_write_part(_newest([mine, *older]), directory, snapshot=True)]
    else:
        assert base is not None
        absorb, compact = _plan(chain, mine.num_rows)
        if compact:
            every = [pq.read_table(base / p.name) for p in reversed(chain)]
            parts = [_write_part(_newest([mine, *every]), directory, snapshot=True)]
        else:
            keep, merged = chain[: len(chain) - absorb], chain[len(chain) - absorb :]
            older = [pq.read_table(base / p.name) for p in reversed(merged)]
            for p in keep:
                link(base, p.name, directory)
            parts = [*keep, _write_part(_newest([mine, *older]), directory, snapshot=False)]
    doc = {"v": 1, "parts": [asdict(p) for p in parts]}
    (directory / MANIFEST).write_text(json.dumps(doc))
    return parts


@dataclass
class UserHistories:
    """user -> (recent rows, seen rows), for the users a round touches."""

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
        table = read_table(directory, users)
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
        return exists(directory)

    def extended(self, new: dict[str, list[int]]) -> UserHistories:
        """These histories with the new sequences appended (only the users in ``new``)."""
        out = UserHistories(self.max_len)
        for u, rows in new.items():
            out.recent[u] = (self.recent.get(u, []) + rows)[-self.max_len :]
            out.seen[u] = self.seen.get(u, set()) | set(rows)
        return out

    def table(self) -> pa.Table:
        return pa.table(
            {
                "user_id": pa.array(list(self.recent), pa.string()),
                "recent": pa.array(list(self.recent.values()), pa.list_(pa.int32())),
                "seen": pa.array(
                    [sorted(self.seen.get(u, set())) for u in self.recent], pa.list_(pa.int32())
                ),
            },
            schema=_SCHEMA,
        )

    def save(self, directory: Path, base: Path | None) -> None:
        """Write the index as of ``directory``'s version: ``base``'s, where ours replace its
        entries. Writes our entries (see ``save_chain``), never ``base``'s whole index."""
        save_chain(self.table(), directory, base)
