"""Arrow tables shaped like the buffer's, from the synthetic drifting stream (no Kafka)."""

from __future__ import annotations

import pyarrow as pa

from streams.datasets import DriftSpec, synthetic_drift
from streams.events import RowBatch


def synthetic_table(events: int, seed: int = 0, start: int = 0, users: int = 60) -> pa.Table:
    """Events [start, start + events) of one synthetic stream, with partition-0 offsets."""
    spec = DriftSpec(users=users, events=start + events, seed=seed, new_item_every=150,
                     drift_every=4000, items_per_topic=25, topics=6)  # fmt: skip
    rows = RowBatch()
    for n, e in enumerate(synthetic_drift(spec)):
        if n >= start:
            rows.append(e, "events", 0, n)
    return rows.to_table()


def watermark_of(table: pa.Table) -> dict[str, int]:
    return {"events:0": int(max(table.column("offset").to_pylist())) + 1}
