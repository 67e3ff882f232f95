"""The error root of streamtune and the stream layer's errors.

Every error streamtune raises on purpose derives from ``StreamtuneError`` (the way Ray Serve's
errors derive from ``RayServeException``), with one subclass per package: ``StreamsError`` here,
``TrainingError`` in ``training.errors``, ``ServingError`` in ``serving.errors`` and
``ServiceError`` in ``services.errors``. ``streams`` is the bottom layer every other package
already imports, so the root lives here. ``assert`` is kept for internal invariants only: it
vanishes under ``python -O``, so data and lineage checks raise these instead.
"""

from __future__ import annotations


class StreamtuneError(Exception):
    """Root of every error streamtune raises deliberately."""


class StreamsError(StreamtuneError):
    """Kafka, event decoding, ingest and buffer errors."""


class StorageError(StreamsError):
    """A local directory or object store refused an operation (credentials, network, config)."""


class EventBufferError(StreamsError):
    """The Parquet event buffer could not do what was asked."""


class BufferWriteError(EventBufferError):
    """A segment could not be written; nothing of it became visible."""

    def __init__(self, path: object, detail: str) -> None:
        super().__init__(f"cannot write segment {path}: {detail}")
        self.path = path


class DiskFullError(BufferWriteError):
    """The buffer's file system has no space left (ENOSPC/EDQUOT) for a segment."""


class CorruptSegmentError(EventBufferError):
    """A segment's bytes or footer fail verification; it has been moved to quarantine."""

    def __init__(self, path: object, detail: str) -> None:
        super().__init__(f"corrupt segment {path}: {detail}")
        self.path = path


class FencedError(EventBufferError):
    """A write covers only offsets the buffer already holds: a stale member's batch, refused."""


class DeadLetterError(StreamsError):
    """The dead-letter topic did not acknowledge a record; its offset must not count as consumed."""
