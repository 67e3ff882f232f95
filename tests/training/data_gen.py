"""Arrow tables shaped like the buffer's, from the synthetic drifting stream (no Kafka)."""

from __future__ import annotations

import pyarrow as pa

# One generator for tests and the fault bench: the worker-kill fault trains on the same stream.
from harness.faults_training import stream_table as synthetic_table

__all__ = ["synthetic_table", "watermark_of"]


def watermark_of(table: pa.Table) -> dict[str, int]:
    return {"events:0": int(max(table.column("offset").to_pylist())) + 1}
