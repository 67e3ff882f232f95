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
