"""Errors of the training layer (model, rounds, registry, gate)."""

from __future__ import annotations

from streams.errors import StreamtuneError


class TrainingError(StreamtuneError):
    """A training round, the model or the registry refused to go on."""
