"""Errors of the long-running services (the loop, `up`, the CLI)."""

from __future__ import annotations

from streams.errors import StreamtuneError


class ServiceError(StreamtuneError):
    """A service of `streamtune up` failed or was misconfigured."""
