"""Errors of the training layer (model, rounds, registry, gate)."""

from __future__ import annotations

from streams.errors import StreamtuneError


class TrainingError(StreamtuneError):
    """A training round, the model or the registry refused to go on."""


class RegistryError(TrainingError):
    """The model registry refused a write or found its state inconsistent."""


class RegistryIntegrityError(RegistryError):
    """A version on disk is incomplete or does not match its recorded hashes."""


class ConcurrentRoundError(RegistryError):
    """Another writer registered a version (or moved the champion) since this one read the
    registry: the caller's work is based on a stale view and must not be registered."""


class NonFiniteWeightsError(RegistryError):
    """A model to register has NaN or infinite weights; nothing was registered."""


class ModelStateError(TrainingError):
    """Saved weights do not fit the model they are loaded into (missing, extra or misshapen)."""


class LineageError(TrainingError):
    """A round's inputs break the version lineage (item map, replay) it continues from."""


class RoundFailedError(TrainingError):
    """The distributed training job of a round failed (after Ray Train's retries)."""


class EmptyRoundError(TrainingError):
    """A round's new events yield no training example (no user has a next item to predict)."""


class UnknownVersionError(RegistryIntegrityError, LookupError):
    """The registry's log has no such version: never registered, or pruned since."""


class RoundTooSmallError(TrainingError):
    """A round's new events hold too few held-out users for the gate to measure quality
    (``gate.min_eval_users``): nothing is trained or registered; wait for more events."""


class HistoriesError(RegistryError):
    """A version has no per-user history index, or its index's parts are missing."""
