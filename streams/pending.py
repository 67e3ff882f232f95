"""Records an ingest member consumed since its last flush, and their way through the decoder.

Each partition's records of a poll are handed to the decode thread (pyarrow parses without the
GIL) while the consuming thread goes back to Kafka; ``collect`` takes the results in consumption
order, dead-letters the refused records and holds the rows. Nothing here is durable: a flush
writes it to the buffer, a failed flush forgets it and the records are re-read from Kafka.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import pyarrow as pa
from kafka.consumer.fetcher import ConsumerRecord
from kafka.producer.future import FutureRecordMetadata

from streams.columns import Decoded, Record
from streams.events import ARROW_SCHEMA
from streams.offsets import OffsetRange

DecodeFn = Callable[[Sequence[bytes | None], Sequence[Record]], Decoded]
DeadLetterFn = Callable[[ConsumerRecord, str, str], None]


@dataclass
class Decoding:
    """One partition's records of a poll, handed to the decode thread."""

    msgs: list[ConsumerRecord]
    decoded: Future[Decoded]
    kept: list[int] | None  # positions in msgs of the decoded values, when not all were
    refused: list[tuple[int, str, str]]  # (position, reason, detail) found before decoding


class Pending:
    """Records consumed since the last flush: valid rows plus the offset span of every record."""

    def __init__(self) -> None:
        self.chunks: list[pa.Table] = []  # decoded rows, buffer columns, in consumption order
        # Polls being decoded on the decode thread, in consumption order (see ``collect``).
        self.decoding: deque[Decoding] = deque()
        self.spans: dict[tuple[str, int], list[int]] = {}  # tp -> [first, last + 1]
        self.records = 0
        self.since = time.monotonic()
        # Dead letters sent for these records: each must be acknowledged before the flush.
        self.dead: list[tuple[FutureRecordMetadata, str, int, int]] = []
        self.dead_by_reason: dict[str, int] = {}

    def cover(self, topic: str, partition: int, first: int, last: int) -> None:
        """Records ``first..last`` (inclusive) of one partition were consumed."""
        if self.records == 0:  # the flush interval runs from the first record held, not idle time
            self.since = time.monotonic()
        span = self.spans.get((topic, partition))
        if span is None:
            self.spans[(topic, partition)] = [first, last + 1]
        else:
            span[1] = last + 1
        self.records += last - first + 1

    def ranges(self) -> list[OffsetRange]:
        return [OffsetRange(t, p, s, e) for (t, p), (s, e) in sorted(self.spans.items())]

    def table(self) -> pa.Table:
        return pa.concat_tables(self.chunks) if self.chunks else ARROW_SCHEMA.empty_table()

    def submit(
        self, msgs: list[ConsumerRecord], pool: ThreadPoolExecutor, decode: DecodeFn, limit: int
    ) -> None:
        """Cover one partition's records of a poll and hand them to the decode thread; values
        over ``limit`` bytes are refused here, without decoding."""
        first, last = msgs[0], msgs[-1]
        self.cover(first.topic, first.partition, first.offset, last.offset)
        values = [m.value for m in msgs]
        refused = [
            (i, "oversized", f"{len(v)} bytes > max_event_bytes={limit}")
            for i, v in enumerate(values)
            if v is not None and len(v) > limit
        ]
        kept: list[int] | None = None
        if refused:
            oversized = {i for i, _, _ in refused}
            kept = [i for i in range(len(msgs)) if i not in oversized]
            values = [values[i] for i in kept]
        sent = msgs if kept is None else [msgs[i] for i in kept]  # where each value came from
        job = pool.submit(decode, values, sent)
        self.decoding.append(Decoding(msgs, job, kept, refused))

    def collect(self, wait: bool, dead_letter: DeadLetterFn) -> None:
        """Take decoded polls in order: dead-letter the refused records, hold the rows.
        ``wait``: all of them (before a flush); else only those already done."""
        while self.decoding and (wait or self.decoding[0].decoded.done()):
            d = self.decoding.popleft()
            decoded = d.decoded.result()
            kept = d.kept
            refused = d.refused + [
                (kept[i] if kept is not None else i, err.reason, err.detail)
                for i, err in decoded.errors
            ]
            for i, reason, detail in sorted(refused):  # dead letters in offset order
                dead_letter(d.msgs[i], reason, detail)
            if decoded.table.num_rows == 0:
                continue
            index = decoded.table["index"]
            if kept is not None:
                index = pa.array(kept, pa.int64()).take(index)
            first = d.msgs[0]
            offsets = pa.array([m.offset for m in d.msgs], pa.int64()).take(index)
            n = decoded.table.num_rows
            rows = decoded.table.drop_columns("index")
            rows = rows.append_column("topic", pa.array([first.topic] * n, pa.string()))
            rows = rows.append_column("partition", pa.array([first.partition] * n, pa.int32()))
            rows = rows.append_column("offset", offsets)
            self.chunks.append(rows)

    def dead_lettered(self, future: FutureRecordMetadata, m: ConsumerRecord, reason: str) -> None:
        """A dead letter was sent for ``m``; the flush waits for its acknowledgement."""
        self.dead.append((future, m.topic, m.partition, m.offset))
        self.dead_by_reason[reason] = self.dead_by_reason.get(reason, 0) + 1

    def cancel(self) -> None:
        """Cancel the decoding nobody will take (the records are being forgotten)."""
        for d in self.decoding:
            d.decoded.cancel()
