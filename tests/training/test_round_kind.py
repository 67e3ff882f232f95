"""Which rounds consolidate: a count kept in the lineage's meta, across rejections and restarts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from training.config import ReplayConfig
from training.registry import Registry
from training.round_finish import round_kind


def _write(d: Path) -> None:
    save_file({"w": np.ones((2, 2), np.float32)}, str(d / "model.safetensors"))


def _rounds(reg: Registry, rcfg: ReplayConfig, n: int, promote: bool = True) -> list[str]:
    kinds = []
    for _ in range(n):
        base = reg.latest()
        kind, since = round_kind(reg, base, reg.champion() is not None, 100, rcfg)
        meta = {"kind": kind, "rounds_since_consolidation": since}
        reg.register(_write, meta, promote=promote or base is None, reason=kind, expect_latest=base)
        kinds.append(kind)
    return kinds


def test_every_nth_round_consolidates_rejected_ones_counted(tmp_path: Path) -> None:
    reg = Registry(tmp_path / "reg", keep=50)
    rcfg = ReplayConfig(consolidate_every=3)
    kinds = _rounds(reg, rcfg, 4) + _rounds(reg, rcfg, 3, promote=False)
    assert kinds == ["first", "incremental", "incremental", "consolidation",
                     "incremental", "incremental", "consolidation"]  # fmt: skip
    # A restarted loop reads the count from the registry: no consolidation right after a restart.
    again = Registry(tmp_path / "reg", keep=50)
    assert _rounds(again, rcfg, 3) == ["incremental", "incremental", "consolidation"]


def test_never_without_a_reservoir_or_when_off(tmp_path: Path) -> None:
    reg = Registry(tmp_path / "reg", keep=50)
    assert _rounds(reg, ReplayConfig(consolidate_every=0), 4)[1:] == ["incremental"] * 3
    base = reg.latest()
    assert round_kind(reg, base, True, 0, ReplayConfig(consolidate_every=1))[0] == "incremental"
    assert round_kind(reg, base, True, 10, ReplayConfig(consolidate_every=1))[0] == "consolidation"
