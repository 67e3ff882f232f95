"""Errors of the serving layer (Serve app, rollouts)."""

from __future__ import annotations

from streams.errors import StreamtuneError


class ServingError(StreamtuneError):
    """Serving or a rollout refused to go on."""


class RolloutError(ServingError):
    """A rollout did not end where it was asked to (e.g. a manual promote was rolled back)."""
