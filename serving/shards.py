"""Which history shard holds a user, and where the shards run.

Live histories are split across ``serving.history_shards`` actors by a stable hash of the user id
(CRC-32: the same on every process and release, unlike Python's salted ``hash``), so a service
with more users than one process should hold adds shards, not a bigger actor. Every shard reads
the whole event stream and keeps its own users: producers need not key events by user, and a
shard's restart rebuilds only its users while the others keep answering.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

SHARD_PREFIX = "streamtune-history"


def shard_of(user: str, shards: int) -> int:
    return zlib.crc32(user.encode()) % shards if shards > 1 else 0


def shard_codes(users: pa.Array | pa.ChunkedArray, shards: int) -> np.ndarray:
    """``shard_of`` of every entry, vectorised over the distinct users (a buffer read has
    ~100 events per user, so the hash runs once per user, not per event)."""
    if isinstance(users, pa.ChunkedArray):
        users = users.combine_chunks()
    if shards <= 1:
        return np.zeros(len(users), dtype=np.int64)
    enc = pc.dictionary_encode(users)
    per_user = np.fromiter(
        (zlib.crc32(u.encode()) % shards for u in enc.dictionary.to_pylist()),
        dtype=np.int64,
        count=len(enc.dictionary),
    )
    return per_user[enc.indices.to_numpy(zero_copy_only=False)]


def split_by_shard(users: Sequence[str], shards: int) -> dict[int, list[int]]:
    """Positions of ``users`` grouped by shard (only shards that get one)."""
    out: dict[int, list[int]] = {}
    for i, u in enumerate(users):
        out.setdefault(shard_of(u, shards), []).append(i)
    return out


def shard_name(index: int, shards: int) -> str:
    """Named by its place in a layout of ``shards``: a changed shard count starts new actors
    instead of finding old ones that hold another split of the users."""
    return f"{SHARD_PREFIX}-{index}-of-{shards}"


def find_shard(index: int, shards: int, namespace: str) -> Any:
    """The running shard's handle, or None when it is not there (yet)."""
    import ray

    try:
        return ray.get_actor(shard_name(index, shards), namespace=namespace)
    except ValueError:
        return None
