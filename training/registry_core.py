"""The registry's ground floor: where it is, its commit log, and a version's files on disk.

Part of the registry (``training.registry`` documents the layout and the commit protocol). The
writes build on this class: ``registry_moves`` (every fact but a registration: the champion
pointer, decision lines, rollbacks, the rollout state, pruning and repair) and
``registry_write`` (registering a version); ``training.registry.Registry`` adds the reading API.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import socket
import threading
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from streams.commitlog import CommitLog
from streams.storage import Storage, StorageConfig, open_storage
from training import registry_shared as shared
from training.errors import RegistryError, UnknownVersionError
from training.registry_files import cache_root, fetch_verified, install, verify_dir
from training.registry_legacy import LEGACY_FILES, legacy_dirs, legacy_entry
from training.registry_log import RegistryEntry, RegistryState, VersionRecord, apply_entry

log = logging.getLogger(__name__)

LOG = "_log"
VERSIONS = "versions"
UPLOADS = "uploads"
REPAIR_GRACE_S = 3600.0
TMP_PREFIX = ".tmp-v-"


def writer() -> str:
    """Who appends a log entry (host:pid)."""
    return f"{socket.gethostname()}:{os.getpid()}"


class RegistryCore:
    """The registry at a local path or an object-store URI (``storage``: how to reach it)."""

    def __init__(
        self, location: Path | str, keep: int = 10, storage: StorageConfig | None = None
    ) -> None:
        self.keep = keep
        self._location = location
        self._storage_cfg = storage
        self.storage: Storage = open_storage(location, storage)
        self.log: CommitLog[RegistryState, RegistryEntry] = CommitLog(
            self.storage, LOG, RegistryState, RegistryEntry, apply_entry
        )
        # One CommitLog is not thread-safe; threads sharing this object take turns on it.
        self._mutex = threading.RLock()
        self._meta_bytes: dict[int, bytes] = {}  # versions are immutable: read meta.json once
        local = self.storage.local_root
        if local is None:
            uri_id = hashlib.sha256(self.storage.uri.encode()).hexdigest()[:16]
            self._cache: Path | None = cache_root() / uri_id
        else:
            self._cache = None
            self._adopt_legacy(local)

    def _portable(self) -> Path | str:
        # A local registry travels as an absolute path: a Ray worker's cwd is not ours.
        local = self.storage.local_root
        return local.resolve() if local is not None else self._location

    @property
    def root(self) -> Path:
        """The directory of a local registry (``location`` names any registry)."""
        local = self.storage.local_root
        if local is None:
            raise RegistryError(
                f"the registry at {self.storage.uri} is not a local directory; pass its "
                "location (Registry.location) instead of a path"
            )
        return local

    @property
    def location(self) -> str:
        return self.storage.uri

    def _state(self) -> RegistryState:
        with self._mutex:
            return self.log.refresh()

    def _commit(
        self, decide: Callable[[RegistryState], RegistryEntry | None]
    ) -> RegistryEntry | None:
        with self._mutex:
            out = self.log.append(decide)
        return None if out is None else out[0]

    def _record(self, version: int, state: RegistryState | None = None) -> VersionRecord:
        rec = (state or self._state()).versions.get(version)
        if rec is None:
            raise UnknownVersionError(
                f"registry {self.location} has no version {version} (never registered, or pruned)"
            )
        return rec

    def _staging_dir(self) -> Path:
        # Next to where the files end up, so a rename moves them there.
        base = self.storage.local_root or self._cache
        assert base is not None
        staging = base / f"{TMP_PREFIX}{os.getpid()}-{uuid.uuid4().hex}"
        staging.mkdir(parents=True)
        return staging

    def _delete_prefix(self, prefix: str) -> None:
        """Delete a version's files (and its upload marker), locally and in the cache."""
        local = self.storage.local_root
        if local is not None:
            shutil.rmtree(local / prefix, ignore_errors=True)
        else:
            for obj in self.storage.list(f"{prefix}/"):
                self.storage.delete(obj.key)
            if self._cache is not None:
                shutil.rmtree(self._cache / prefix, ignore_errors=True)
        if prefix.startswith(f"{VERSIONS}/"):
            self.storage.delete(f"{UPLOADS}/{prefix.rpartition('/')[2]}")

    def path(self, version: int) -> Path:
        """A local directory holding the version's files (downloaded once from an object
        store, and checked against the recorded hashes); UnknownVersionError if none."""
        rec = self._record(version)
        local = self.storage.local_root
        if local is not None:
            return local / rec.prefix
        return self._cached(rec)

    def _cached(self, rec: VersionRecord) -> Path:
        assert self._cache is not None
        dest = self._cache / rec.prefix
        if dest.is_dir():  # only a complete, verified download is ever renamed there
            return dest
        staging = self._staging_dir()
        try:
            fetch_verified(self.storage, rec, staging)
            for name, digest in rec.files.items():
                if shared.is_shared(name):
                    shared.fetch(self.storage, rec.version, name, digest, self._cache, staging)
            install(staging, dest)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return dest

    def verify(self, version: int) -> dict[str, Any]:
        """Re-hash every file of ``version``; raise RegistryIntegrityError if anything is off."""
        return verify_dir(self._record(version), self.path(version))

    def _adopt_legacy(self, root: Path) -> None:
        self._state()
        if self.log.next_entry > 0:
            return
        dirs = legacy_dirs(root)
        if not dirs and not any((root / n).exists() for n in LEGACY_FILES):
            return
        entry = legacy_entry(root, dirs, writer())
        # Two processes opening it at once: the first entry wins, the other adopts nothing.
        if self._commit(lambda _: None if self.log.next_entry > 0 else entry) is not None:
            log.warning("registry %s: adopted %d versions of the older layout", root,
                        len(entry.add))  # fmt: skip
