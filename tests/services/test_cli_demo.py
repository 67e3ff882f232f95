"""`streamtune demo`'s options: each fills in one DemoConfig field, and an option not given leaves
the model's own default (declared once, in ``services.demo.DemoConfig``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

import services.demo
from services.cli import app
from services.demo import DemoConfig


def _config_of(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, *args: str) -> DemoConfig:
    got: list[DemoConfig] = []

    def run_demo(settings: Any, cfg: DemoConfig) -> dict[str, Any]:  # the command's hand-off
        got.append(cfg)
        return {}

    monkeypatch.setattr(services.demo, "run_demo", run_demo)
    res = CliRunner().invoke(app, ["--state-dir", str(tmp_path), "demo", *args])
    assert res.exit_code == 0, res.output
    return got[0]


def test_options_not_given_keep_the_models_defaults(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    assert _config_of(monkeypatch, tmp_path) == DemoConfig()


def test_each_option_fills_in_its_field(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    cfg = _config_of(monkeypatch, tmp_path, "--events", "5000", "--rate", "50",
                     "--slice-events", "700", "--first-round-events", "1500", "--query-rps", "3",
                     "--live", "off", "--keep", "--out", str(tmp_path / "o"))  # fmt: skip
    assert cfg == DemoConfig(events=5000, rate=50, slice_events=700, first_round_events=1500,
                             query_rps=3, live="off", keep=True, out=tmp_path / "o")  # fmt: skip


def test_a_value_out_of_range_is_refused_with_the_fields_rule(tmp_path: Path) -> None:
    res = CliRunner().invoke(app, ["--state-dir", str(tmp_path), "demo", "--live", "sometimes"])
    assert res.exit_code == 2 and "off" in res.output and "canary" in res.output
