"""The GPU check's own logic, where no GPU is: it skips and says why; parity is measured right."""

from __future__ import annotations

import json

import pytest
import torch

from harness.gpu_check import main, parity


@pytest.mark.skipif(torch.cuda.is_available(), reason="the skip path needs a machine without GPU")
def test_without_a_gpu_it_skips_and_says_why(capsys: pytest.CaptureFixture[str]) -> None:
    main([])
    out = capsys.readouterr().out.strip().splitlines()
    record = json.loads(out[-1])
    assert record["bench"] == "gpu_check" and record["skipped"] is True
    assert "no GPU" in record["reason"] and "--cpu" in out[0]


def test_parity_is_relative_step_by_step() -> None:
    got = parity([2.0, 1.0, 0.5, 0.25], [2.0, 1.1, 0.5, 0.2])
    assert got["first_step_rel"] == 0.0
    assert got["max_rel"] == pytest.approx(0.2)
    assert got["mean_rel_second_half"] == pytest.approx(0.1)
