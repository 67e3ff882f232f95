"""The model registry: immutable, hashed, atomically written versions plus a champion alias.

Layout under ``root``::

    v000001/ model.safetensors  vocab.json  popularity.json  titles.json
              replay.{safetensors,json}  replay_eval.{safetensors,json}  meta.json  _SUCCESS
    champion.json      {"version": 3}         (atomic replace)
    decisions.jsonl    one line per promote / reject / rollback, fsync'd

A version directory appears only by rename after every file (and the directory) is fsync'd, and
``_SUCCESS`` is written last, so readers never see a partial version. ``meta.json`` holds the
sha256 of every other file; loading re-hashes them and refuses a truncated or tampered version.
Weights are safetensors: nothing here unpickles.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from streams.buffer import atomic_write_bytes, fsync_dir
from training.config import ModelConfig
from training.model import Recommender, load_weights
from training.vocab import ItemVocab

SUCCESS = "_SUCCESS"


class RegistryIntegrityError(ValueError):
    """A version on disk is incomplete or does not match its recorded hashes."""


@dataclass(frozen=True)
class LoadedVersion:
    version: int
    model: Recommender
    vocab: ItemVocab
    meta: dict[str, Any]
    path: Path


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_file(path: Path) -> None:
    with path.open("rb") as fh:
        os.fsync(fh.fileno())


class Registry:
    def __init__(self, root: Path, keep: int = 10) -> None:
        self.root = root
        self.keep = keep
        self.root.mkdir(parents=True, exist_ok=True)

    # -- writing ------------------------------------------------------------------------
    def register(self, write: Callable[[Path], None], meta: dict[str, Any]) -> int:
        """Create the next version: ``write(dir)`` puts its files in a temp dir; returns it."""
        tmp = self.root / f".tmp-{uuid.uuid4().hex}"
        tmp.mkdir()
        try:
            write(tmp)
            files = sorted(p.name for p in tmp.iterdir() if p.is_file())
            version = self._next_version()
            meta = {
                **meta,
                "version": version,
                "created_at": time.time(),
                "files": {name: _sha256(tmp / name) for name in files},
            }
            (tmp / "meta.json").write_text(json.dumps(meta, indent=1, sort_keys=True))
            for name in [*files, "meta.json"]:
                _fsync_file(tmp / name)
            fsync_dir(tmp)
            final = self.root / f"v{version:06d}"
            os.rename(tmp, final)
            fsync_dir(self.root)
            # The marker last: a crash before this line leaves a version readers ignore.
            (final / SUCCESS).write_text(meta["files"]["model.safetensors"])
            _fsync_file(final / SUCCESS)
            fsync_dir(final)
            return version
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _next_version(self) -> int:
        existing = [int(p.name[1:]) for p in self.root.glob("v[0-9]*") if p.name[1:].isdigit()]
        return max(existing, default=0) + 1

    def set_champion(self, version: int, reason: str, decision: str = "promote") -> None:
        self.verify(version)
        atomic_write_bytes(self.root / "champion.json", json.dumps({"version": version}).encode())
        self.record(version, decision, reason)
        self.prune()

    def record(self, version: int, decision: str, reason: str, **extra: Any) -> None:
        line = {"ts": time.time(), "version": version, "decision": decision, "reason": reason}
        line.update(extra)
        with (self.root / "decisions.jsonl").open("a") as fh:
            fh.write(json.dumps(line) + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def mark_rolled_back(self, version: int, reason: str, to: int | None) -> None:
        """Serving saw ``version`` misbehave: point the champion back at ``to`` and say why."""
        if to is not None:
            atomic_write_bytes(self.root / "champion.json", json.dumps({"version": to}).encode())
        self.record(version, "rollback", reason, to=to)

    def prune(self) -> list[int]:
        """Keep the newest ``keep`` versions, the champion and its parent; delete the rest."""
        versions = self.versions()
        champ = self.champion()
        protect = {champ} if champ else set()
        if champ:
            parent = self.meta(champ).get("parent")
            if parent:
                protect.add(int(parent))
        doomed = [v for v in versions[: -self.keep] if v not in protect]
        for v in doomed:
            shutil.rmtree(self.root / f"v{v:06d}", ignore_errors=True)
        return doomed

    # -- reading ------------------------------------------------------------------------
    def versions(self) -> list[int]:
        """Complete versions (with their success marker), oldest first."""
        return sorted(
            int(p.name[1:])
            for p in self.root.glob("v[0-9]*")
            if p.name[1:].isdigit() and (p / SUCCESS).exists()
        )

    def champion(self) -> int | None:
        try:
            return int(json.loads((self.root / "champion.json").read_text())["version"])
        except FileNotFoundError:
            return None

    def latest(self) -> int | None:
        vs = self.versions()
        return vs[-1] if vs else None

    def path(self, version: int) -> Path:
        return self.root / f"v{version:06d}"

    def meta(self, version: int) -> dict[str, Any]:
        data: dict[str, Any] = json.loads((self.path(version) / "meta.json").read_text())
        return data

    def decisions(self) -> list[dict[str, Any]]:
        try:
            lines = (self.root / "decisions.jsonl").read_text().splitlines()
        except FileNotFoundError:
            return []
        return [json.loads(line) for line in lines if line.strip()]

    def verify(self, version: int) -> dict[str, Any]:
        """Re-hash every file of ``version``; raise RegistryIntegrityError if anything is off."""
        d = self.path(version)
        if not (d / SUCCESS).exists():
            raise RegistryIntegrityError(
                f"version {version} at {d} is incomplete (no {SUCCESS} marker): it was never "
                "fully written; register it again"
            )
        try:
            meta = self.meta(version)
        except (FileNotFoundError, json.JSONDecodeError) as err:
            raise RegistryIntegrityError(
                f"version {version}: unreadable meta.json ({err})"
            ) from None
        for name, digest in meta["files"].items():
            f = d / name
            if not f.exists():
                raise RegistryIntegrityError(f"version {version}: {name} is missing")
            actual = _sha256(f)
            if actual != digest:
                raise RegistryIntegrityError(
                    f"version {version}: {name} has sha256 {actual[:12]}…, expected "
                    f"{digest[:12]}… (truncated or tampered); restore it or delete the version"
                )
        return meta

    def load(self, version: int | None = None) -> LoadedVersion:
        """Verify and load a version (default: the champion). Read-only."""
        v = version if version is not None else self.champion()
        if v is None:
            raise LookupError(f"registry {self.root} has no champion yet; run a training round")
        meta = self.verify(v)
        d = self.path(v)
        cfg = ModelConfig(**meta["model_config"])
        model = load_weights(d / "model.safetensors", cfg)
        model.eval()
        vocab = ItemVocab.load(d / "vocab.json")
        return LoadedVersion(v, model, vocab, meta, d)
