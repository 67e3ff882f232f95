"""The shipped alert rules: valid, and each one fires and stays quiet as its promtool test says."""

from __future__ import annotations

import subprocess
from pathlib import Path

import yaml

from services.prometheus import promtool

RULES = Path(__file__).resolve().parents[2] / "deploy" / "prometheus"


def _promtool(*args: str) -> str:
    proc = subprocess.run([str(promtool()), *args], cwd=RULES, capture_output=True, text=True,
                          check=False, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout + proc.stderr


def test_rules_are_valid() -> None:
    out = _promtool("check", "rules", "alerts.yml")
    assert "SUCCESS: 7 rules found" in out, out


def test_every_rule_fires_and_stays_quiet_in_its_unit_tests() -> None:
    out = _promtool("test", "rules", "alerts_test.yml")
    assert "SUCCESS" in out and "FAILED" not in out, out
    rules = yaml.safe_load((RULES / "alerts.yml").read_text())["groups"][0]["rules"]
    cases = yaml.safe_load((RULES / "alerts_test.yml").read_text())["tests"]
    fired: set[str] = set()
    quiet: set[str] = set()
    for case in cases:
        for check in case["alert_rule_test"]:
            (fired if check["exp_alerts"] else quiet).add(check["alertname"])
    names = {r["alert"] for r in rules}
    assert names == fired, f"rules without a test that fires them: {names - fired}"
    assert names == quiet, f"rules without a test that keeps them quiet: {names - quiet}"
