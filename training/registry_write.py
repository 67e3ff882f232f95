"""Registering a version: its files uploaded under a fresh prefix, then one log entry that
makes it visible with its number, its decision and (when promoted) the champion's move.

Part of the registry (``training.registry`` documents the layout and the commit protocol).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import EllipsisType
from typing import Any

from streams.storage import fsync_dir
from training import registry_shared as shared
from training.errors import ConcurrentRoundError, RegistryError
from training.registry_core import REPAIR_GRACE_S, UPLOADS, VERSIONS, writer
from training.registry_files import META, WEIGHTS, check_finite, fsync_file, install
from training.registry_log import (
    ChampionState,
    Decision,
    RegistryEntry,
    RegistryState,
    VersionMeta,
    VersionRecord,
)
from training.registry_moves import RegistryMoves


@dataclass(frozen=True)
class _Upload:
    """A version's uploaded files, waiting for the log entry that makes them visible."""

    key: str  # ``<upload ms>-<random id>``: its prefix under versions/ and its marker's name
    digests: dict[str, str]
    meta: dict[str, Any]
    promote: bool
    reason: str
    expect_latest: int | EllipsisType | None

    @property
    def prefix(self) -> str:
        return f"{VERSIONS}/{self.key}"


class RegistryWrites(RegistryMoves):
    """The registry's writes, registration included."""

    def register(
        self,
        write: Callable[[Path], None],
        meta: dict[str, Any],
        *,
        promote: bool = False,
        reason: str = "registered outside a training round",
        expect_latest: int | EllipsisType | None = ...,
    ) -> int:
        """Create the next version and record its decision; returns the version number.

        ``write(dir)`` puts the version's files in a temporary directory. ``promote`` moves the
        champion to the new version; either way the decision (promote/reject + ``reason``) is
        recorded in the same log entry. ``expect_latest``: the latest version the caller built
        on (None = the registry was empty); if another writer registered since,
        ConcurrentRoundError is raised and nothing becomes visible. Leave it out (``...``) to
        skip that check.
        """
        self._check_latest(self._state(), expect_latest)  # refuse early: nothing uploaded yet
        staging = self._staging_dir()
        key = f"{time.time_ns() // 1_000_000:013d}-{uuid.uuid4().hex[:8]}"
        prefix = f"{VERSIONS}/{key}"
        meta_bytes: list[bytes] = []
        uploaded = False
        try:
            write(staging)
            if not (staging / WEIGHTS).exists():
                raise RegistryError(f"a version needs {WEIGHTS}; write() did not create it")
            check_finite(staging / WEIGHTS)
            files = [name for name in shared.files(staging) if name != META]
            inherited = self._inherited(expect_latest)
            digests = shared.digests(staging, files, inherited)
            uploaded = True
            self._upload(staging, key, files, inherited)

            upload = _Upload(key, digests, meta, promote, reason, expect_latest)
            # Decided again on the fresh state whenever another writer took the entry number.
            entry = self._commit(lambda state: self._entry(state, upload, meta_bytes))
            assert entry is not None  # decide never returns None
            version = entry.add[0].version
            if self._cache is not None:
                (staging / META).write_bytes(meta_bytes[0])
                shared.keep_cached(self._cache, staging, files)
                install(staging, self._cache / prefix)  # the writer's copy is the verified cache
        except BaseException:
            if uploaded and not self._committed(prefix):
                self._delete_prefix(prefix)
            raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        if promote:
            self.prune()
        return version

    def _entry(self, state: RegistryState, up: _Upload, meta_bytes: list[bytes]) -> RegistryEntry:
        """The log entry registering ``up`` as the next version, decided on ``state``; writes
        its meta.json (for exactly that number) first."""
        self._check_latest(state, up.expect_latest)
        if not self.storage.exists(f"{UPLOADS}/{up.key}"):
            raise RegistryError(
                f"upload {up.prefix} was removed by repair() before it was committed "
                f"(it took over {REPAIR_GRACE_S:.0f}s); nothing was registered"
            )
        version, champ = state.next_version, state.champion
        full = VersionMeta.model_validate({
            **up.meta,
            "version": version,
            "created_at": time.time(),
            "files": up.digests,
            "decision": "promote" if up.promote else "reject",
            "reason": up.reason,
            "base_generation": champ.generation,
        })  # fmt: skip
        data = full.model_dump_json(indent=1).encode()
        self.storage.write(f"{up.prefix}/{META}", data)
        meta_bytes[:] = [data]
        rec = VersionRecord(
            version=version,
            prefix=up.prefix,
            files={**up.digests, META: hashlib.sha256(data).hexdigest()},
            parent=full.parent,
        )
        moved = ChampionState(version=version, generation=champ.generation + 1)
        line = Decision(version=version, decision=full.decision or "reject", reason=up.reason)
        return RegistryEntry(
            kind="register",
            add=[rec],
            champion=moved if up.promote else None,
            decisions=[line],
            writer=writer(),
        )

    def _check_latest(self, state: RegistryState, expect_latest: int | EllipsisType | None) -> None:
        latest = max(state.versions, default=None)
        if expect_latest is not ... and latest != expect_latest:
            raise ConcurrentRoundError(
                f"registry {self.location}: latest version is {latest}, this round was built "
                f"on {expect_latest}; another process registered first, so this round is not "
                "registered"
            )

    def _inherited(self, expect_latest: int | EllipsisType | None) -> dict[str, str]:
        """The files of the version a writer built on (its shared files need no re-hashing)."""
        if not isinstance(expect_latest, int):
            return {}
        rec = self._state().versions.get(expect_latest)
        return dict(rec.files) if rec is not None else {}

    def _upload(self, staging: Path, key: str, files: list[str], inherited: dict[str, str]) -> None:
        """Put the files under ``versions/<key>/`` (shared ones: see ``registry_shared``),
        invisible until an entry names them."""
        # First: repair finds the upload, and blob collection the shared files it uses.
        self.storage.write(f"{UPLOADS}/{key}", shared.marker(writer(), files))
        local = self.storage.local_root
        if local is None:
            shared.upload(self.storage, staging, files, inherited)
            for name in files:
                if not shared.is_shared(name):
                    self.storage.write(f"{VERSIONS}/{key}/{name}", (staging / name).read_bytes())
            return
        for name in files:
            fsync_file(staging / name)
        if (staging / shared.SHARED).is_dir():
            fsync_dir(staging / shared.SHARED)
        fsync_dir(staging)
        (local / VERSIONS).mkdir(exist_ok=True)
        os.rename(staging, local / VERSIONS / key)
        fsync_dir(local / VERSIONS)

    def _committed(self, prefix: str) -> bool:
        """Whether a live version uses ``prefix`` (the entry may have landed before a failure)."""
        try:
            return any(r.prefix == prefix for r in self._state().versions.values())
        except Exception:  # cannot tell: keep the files, repair() decides later
            return True
