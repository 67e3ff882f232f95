"""Adopting a registry directory written by the older layout, by one log entry.

That layout kept ``v000001/`` directories (complete once ``_SUCCESS`` was written), and beside them
``champion.json``, ``decisions.jsonl`` and ``rollout.json``. Part of the registry: only
``training.registry_core`` calls this, once, when it opens a local directory whose log is empty.
A complete version that had no decision line (a registration a crash interrupted) is adopted as
rejected; version numbers of incomplete directories are never reused.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

from training.registry_files import META
from training.registry_log import (
    ChampionState,
    Decision,
    RegistryEntry,
    RolloutState,
    VersionMeta,
    VersionRecord,
)

LEGACY_SUCCESS = "_SUCCESS"
LEGACY_FILES = ("champion.json", "decisions.jsonl", "rollout.json")

log = logging.getLogger(__name__)


def legacy_dirs(root: Path) -> list[Path]:
    """The older layout's version directories under ``root``, oldest first."""
    return sorted(p for p in root.glob("v[0-9]*") if p.is_dir() and p.name[1:].isdigit())


def legacy_entry(root: Path, dirs: list[Path], writer: str) -> RegistryEntry:
    """One entry holding everything an older-layout registry directory knew."""
    recs: list[VersionRecord] = []
    for d in dirs:
        if not (d / LEGACY_SUCCESS).exists():
            continue  # its writer died before the marker: it never was a version
        try:
            raw = (d / META).read_bytes()
            meta = VersionMeta.model_validate_json(raw)
        except (OSError, ValueError) as err:
            log.warning("registry %s: not adopting %s: unreadable meta.json (%s)", root, d, err)
            continue
        files = {**meta.files, META: hashlib.sha256(raw).hexdigest()}
        recs.append(VersionRecord(version=int(d.name[1:]), prefix=d.name, files=files,
                                  parent=meta.parent))  # fmt: skip
    try:  # an older file without generation reads as 0
        champion = ChampionState.model_validate_json((root / "champion.json").read_bytes())
    except FileNotFoundError:
        champion = ChampionState()
    decisions: list[Decision] = []
    try:
        lines = (root / "decisions.jsonl").read_text().splitlines()
    except FileNotFoundError:
        lines = []
    for line in lines:
        try:
            decisions.append(Decision.model_validate_json(line))
        except ValueError:
            continue  # a torn last line of a crashed append
    decided = {d.version for d in decisions}
    for rec in recs:
        if rec.version not in decided:
            decisions.append(Decision(
                version=rec.version,
                decision="reject",
                reason="adopted from the older layout without a decision line (its registration "
                "was interrupted); not promoted",
                repaired=True,
            ))  # fmt: skip
    try:
        rollout: RolloutState | None = RolloutState.model_validate_json(
            (root / "rollout.json").read_bytes()
        )
    except FileNotFoundError:
        rollout = None
    used = [int(d.name[1:]) for d in dirs]  # incomplete ones too: numbers are never reused
    return RegistryEntry(
        kind="adopt",
        add=recs,
        champion=champion,
        decisions=decisions,
        rollout=rollout,
        next_version=max(used, default=0) + 1,
        writer=writer,
    )
