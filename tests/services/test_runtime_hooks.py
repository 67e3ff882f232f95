"""The runtime's metric hooks: a failure there never stops ingest, and is logged once per streak
with its reason (not at debug level, where nobody would see it)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, cast

import pytest

from services.metrics import StreamMetrics
from services.runtime import _new_ingestor
from services.settings import Settings
from streams.buffer import EventBuffer
from streams.config import BufferConfig


class _Metrics:
    """Stands in for StreamMetrics' flush hook: fails while ``broken``."""

    def __init__(self) -> None:
        self.broken, self.seen = True, 0

    def on_flush(self, seg: Any, stats: Any, member: str) -> None:
        if self.broken:
            raise RuntimeError("exporter away")
        self.seen += 1


def test_a_failing_ingest_metrics_hook_is_logged_once_per_streak(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    s = Settings(state_dir=tmp_path)
    metrics = _Metrics()
    buffer = EventBuffer(BufferConfig(path=tmp_path / "buf"))
    ingestor = _new_ingestor(s, buffer, cast(StreamMetrics, metrics))
    hook = ingestor.on_flush
    assert hook is not None
    with caplog.at_level(logging.WARNING, logger="services.runtime"):
        for _ in range(3):
            hook(object(), ingestor.stats)  # raises inside: must not reach the ingest loop
        metrics.broken = False
        hook(object(), ingestor.stats)
    said = [r.getMessage() for r in caplog.records]
    assert said == [
        "updating the ingest metrics failed (RuntimeError: exporter away); ingest goes on; the "
        "dashboards miss those segments",
        "updating the ingest metrics works again after 3 failures",
    ], said
    assert metrics.seen == 1
