"""The stream rows of the fault table (harness/faults_streams.py), quick forms, against real Kafka.

Each asserts the row survived with nothing lost or duplicated, and that the fault really happened.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from harness.faults_streams import (
    fault_broker_kill,
    fault_corrupt_segment,
    fault_disk_full,
    fault_stalled_member,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def assert_survived(row: dict[str, object]) -> None:
    assert row["survived"], row
    assert row["lost"] == 0 and row["duplicated"] == 0, row
    assert row["failed_requests"] is None, row  # no serving in these faults: not measured
    assert isinstance(row["recover_s"], float) and row["recover_s"] >= 0, row


def test_broker_killed_mid_ingest(tmp_path: Path) -> None:
    row = fault_broker_kill(tmp_path, quick=True)
    assert_survived(row)
    # The broker JVM really died mid-ingest and a new one served the rest.
    assert row["pid_gone"] is True and row["restarted_pid"] != row["killed_pid"], row
    assert 0 < row["rows_at_kill"] < 10_000, row  # type: ignore[operator]


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")
def test_disk_full_while_writing_segments(tmp_path: Path) -> None:
    row = fault_disk_full(tmp_path, quick=True)
    assert_survived(row)
    assert row["disk_full_errors"] >= 3 and row["temp_files_left"] == 0, row  # type: ignore[operator]
    assert "disk full" in str(row["error"]), row


def test_corrupt_segment_is_quarantined_and_reingested(tmp_path: Path) -> None:
    row = fault_corrupt_segment(tmp_path, quick=True)
    assert_survived(row)
    assert len(row["quarantined"]) == 1 and row["leaked_rows"] == 0, row  # type: ignore[arg-type]
    assert row["rows_withheld"] > 0, row  # type: ignore[operator]


def test_stalled_member_batch_is_fenced(tmp_path: Path) -> None:
    row = fault_stalled_member(tmp_path, quick=True)
    assert_survived(row)
    assert row["stalled_refused"] > 0 and row["exit_codes"] == [0, 0], row  # type: ignore[operator]
