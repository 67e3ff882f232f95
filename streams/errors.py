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


class MissingTopicError(StreamsError):
    """A topic streamtune needs is missing and ``topics.create`` is false, so it may not make it."""


class SchemaRegistryError(StreamsError):
    """The schema registry (or the local one the project starts) refused or failed a request."""


class SchemaRegistryUnavailableError(SchemaRegistryError):
    """The schema registry did not answer (refused, timed out, 5xx): an outage, not bad records.

    Raised instead of dead-lettering: the records are fine and must be decoded once it is back.
    """


class KafkaSecurityError(StreamsError):
    """The broker refused the connection's TLS or SASL settings; ``setting`` names what to fix."""

    def __init__(self, setting: str, detail: str) -> None:
        super().__init__(f"{detail} (fix {setting})")
        self.setting = setting
