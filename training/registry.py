"""The model registry: immutable, hashed versions, a champion alias, a decision log and the
rollout state, on a local directory or an object-store prefix (``s3://``, ``gs://``, ``az://``).

Layout under the registry's location (this module is the only one that knows it; the checks on a
version's files are in ``registry_files``, the log's typed entries in ``registry_log``)::

    versions/<ms>-<id>/  model.safetensors  vocab.json  popularity.json  titles.json
                         replay.{safetensors,json}  replay_eval.{safetensors,json}
                         recent_questions.{safetensors,json}  histories.json  meta.json
                         shared/<sha256>.parquet   files shared with other versions, by content
                                                   (locally hard links; ``registry_shared``)
    blobs/<sha256>.parquet   object store only: the shared files' bytes, stored once
    uploads/<ms>-<id>    marker written before the files: "these files exist" (ms = upload time)
    _log/<n:020d>.json   the commit log (``streams.commitlog``): the only source of truth
    _log/<n>.checkpoint.json, _log/_latest     the folded state every 100 entries
    v000001/ ...         a version adopted from the older directory layout (see below)

Commit protocol. ``register`` writes a version's files once under a fresh prefix named by upload
time and a random id, never by version number (that is not known yet): locally into a temporary
directory that one rename moves into ``versions/``, on an object store one PUT per file. None of
it is visible: a version exists only once a log entry names its prefix. That entry is appended
with the log's create-only write and is decided on the freshest state, again whenever another
writer took the entry number first: the version number is the highest ever allocated + 1,
``expect_latest`` is checked against the latest version (ConcurrentRoundError), and
``meta.json`` (sha256 of every other file, the decision, the champion generation it was made
against) is written for exactly that number before the entry names it. The same entry carries
the decision (promote or reject, with its reason) and, for a promotion, the champion's move to
generation g+1. "Registered", "decided" and "promoted" are therefore one atomic step: no crash
leaves a version without its decision, two writers never get one number, and a writer that
built on a stale latest version never registers.

Every other fact is an entry too (``RegistryEntry.kind``): a manual champion move
(``set_champion``; ``expect_generation`` is the compare-and-swap, checked when deciding), a bare
decision line (``record``), a rollback (the pointer moves back only while the bad version is still
the champion), the rollout controller's state, a prune (versions leave the state first, their
files are deleted after) and the one-time adoption of an older registry. Every reader folds the
same entries into the same ``RegistryState``.

A crash leaves garbage, never inconsistency: an upload no entry names (killed before its commit)
or the files of a pruned version (killed before the delete). ``repair()`` deletes the files of
every ``uploads/`` marker that no live version references once it is older than a grace period,
so an upload still in flight is left alone (and a commit re-checks its marker).

Readers. ``path(version)`` is a local directory with the version's files: its own directory in a
local registry; for an object store a cache directory (``$STREAMTUNE_CACHE`` or
``~/.cache/streamtune``, then ``registry/<sha of the URI>/<prefix>``) downloaded once and checked
against the hashes the log recorded. Versions are immutable, so the cache never goes stale.
``verify`` re-hashes every file and ``load`` refuses a truncated or tampered file and a model with
a NaN or infinite weight. Weights are safetensors: nothing here unpickles.

A local directory written by the older layout (``v000001/`` directories with ``_SUCCESS``,
``champion.json``, ``decisions.jsonl``, ``rollout.json``) is adopted on first open by one log
entry (``registry_legacy``); from then on only its version directories are read.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import EllipsisType
from typing import TYPE_CHECKING, Any

from streams.commitlog import CommitLog
from streams.storage import Storage, StorageConfig, fsync_dir, open_storage
from training import registry_shared as shared
from training.config import ModelConfig
from training.errors import (
    ConcurrentRoundError,
    NonFiniteWeightsError,
    RegistryError,
    RegistryIntegrityError,
    UnknownVersionError,
)
from training.registry_files import (
    META,
    WEIGHTS,
    cache_root,
    check_finite,
    fetch_verified,
    fsync_file,
    install,
    mismatch,
    pid_alive,
    verify_dir,
)
from training.registry_legacy import LEGACY_FILES, legacy_dirs, legacy_entry
from training.registry_log import (
    ChampionState,
    Decision,
    RegistryEntry,
    RegistryState,
    RolloutState,
    VersionMeta,
    VersionRecord,
    apply_entry,
)
from training.vocab import ItemVocab

if TYPE_CHECKING:  # imported lazily at run time: reading the registry needs no torch
    import pyarrow as pa

    from training.model import Recommender

__all__ = [
    "ChampionState",
    "ConcurrentRoundError",
    "Decision",
    "LoadedVersion",
    "NonFiniteWeightsError",
    "Registry",
    "RegistryEntry",
    "RegistryError",
    "RegistryIntegrityError",
    "RegistryState",
    "RolloutState",
    "UnknownVersionError",
    "VersionMeta",
    "VersionRecord",
]

log = logging.getLogger(__name__)

LOG = "_log"
VERSIONS = "versions"
UPLOADS = "uploads"
REPAIR_GRACE_S = 3600.0
_TMP_PREFIX = ".tmp-v-"


@dataclass(frozen=True)
class LoadedVersion:
    version: int
    model: Recommender
    vocab: ItemVocab
    meta: dict[str, Any]
    path: Path


def _writer() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


class Registry:
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

    def __reduce__(self) -> tuple[Any, ...]:
        # Sent to Ray tasks: rebuilt from where it is (a fresh log reader and lock there).
        return (Registry, (self._portable(), self.keep, self._storage_cfg))

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

    # -- the log --------------------------------------------------------------------------
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

    # -- writing --------------------------------------------------------------------------
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

            def decide(state: RegistryState) -> RegistryEntry:
                # Re-run on the fresh state whenever another writer took the entry number.
                self._check_latest(state, expect_latest)
                if not self.storage.exists(f"{UPLOADS}/{key}"):
                    raise RegistryError(
                        f"upload {prefix} was removed by repair() before it was committed "
                        f"(it took over {REPAIR_GRACE_S:.0f}s); nothing was registered"
                    )
                version, champ = state.next_version, state.champion
                full = VersionMeta.model_validate({
                    **meta,
                    "version": version,
                    "created_at": time.time(),
                    "files": digests,
                    "decision": "promote" if promote else "reject",
                    "reason": reason,
                    "base_generation": champ.generation,
                })  # fmt: skip
                data = full.model_dump_json(indent=1).encode()
                self.storage.write(f"{prefix}/{META}", data)
                meta_bytes[:] = [data]
                rec = VersionRecord(
                    version=version,
                    prefix=prefix,
                    files={**digests, META: hashlib.sha256(data).hexdigest()},
                    parent=full.parent,
                )
                moved = ChampionState(version=version, generation=champ.generation + 1)
                line = Decision(version=version, decision=full.decision or "reject", reason=reason)
                return RegistryEntry(
                    kind="register",
                    add=[rec],
                    champion=moved if promote else None,
                    decisions=[line],
                    writer=_writer(),
                )

            entry = self._commit(decide)
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

    def _check_latest(self, state: RegistryState, expect_latest: int | EllipsisType | None) -> None:
        latest = max(state.versions, default=None)
        if expect_latest is not ... and latest != expect_latest:
            raise ConcurrentRoundError(
                f"registry {self.location}: latest version is {latest}, this round was built "
                f"on {expect_latest}; another process registered first, so this round is not "
                "registered"
            )

    def _staging_dir(self) -> Path:
        # Next to where the files end up, so a rename moves them there.
        base = self.storage.local_root or self._cache
        assert base is not None
        staging = base / f"{_TMP_PREFIX}{os.getpid()}-{uuid.uuid4().hex}"
        staging.mkdir(parents=True)
        return staging

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
        self.storage.write(f"{UPLOADS}/{key}", shared.marker(_writer(), files))
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

    def set_champion(
        self,
        version: int,
        reason: str,
        decision: str = "promote",
        expect_generation: int | None = None,
    ) -> ChampionState:
        """Point the champion at ``version`` (verified first) and record why.

        ``expect_generation``: the champion generation the caller's decision was based on;
        raises ConcurrentRoundError if the pointer moved since. None = the current one.
        """
        self.verify(version)

        def decide(state: RegistryState) -> RegistryEntry:
            self._record(version, state)  # pruned since it was verified: refuse
            gen = state.champion.generation
            want = gen if expect_generation is None else expect_generation
            if gen != want:
                raise ConcurrentRoundError(
                    f"champion generation is {gen}, expected {want}: another writer moved the "
                    "champion"
                )
            return RegistryEntry(
                kind="champion",
                champion=ChampionState(version=version, generation=gen + 1),
                decisions=[Decision(version=version, decision=decision, reason=reason)],
                writer=_writer(),
            )

        entry = self._commit(decide)
        assert entry is not None and entry.champion is not None
        self.prune()
        return entry.champion.model_copy()

    def record(self, version: int, decision: str, reason: str, **extra: Any) -> None:
        """Append a decision line (no pointer move), e.g. ``rollback-impossible``."""
        line = Decision(version=version, decision=decision, reason=reason, **extra)
        self._commit(lambda _: RegistryEntry(kind="record", decisions=[line], writer=_writer()))

    def mark_rolled_back(self, version: int, reason: str, to: int | None) -> ChampionState:
        """Serving saw ``version`` misbehave: point the champion back at ``to`` and say why.

        The pointer moves only while ``version`` is still the champion: a newer decision (a
        round that promoted something else meanwhile) is never overwritten by a rollback.
        """
        after: list[ChampionState] = []

        def decide(state: RegistryState) -> RegistryEntry:
            cur = state.champion
            extra: dict[str, Any] = {}
            moved = None
            if to is not None and cur.version == version:
                moved = ChampionState(version=to, generation=cur.generation + 1)
            elif to is not None:
                extra["champion_kept"] = cur.version
            after[:] = [(moved or cur).model_copy()]
            line = Decision(version=version, decision="rollback", reason=reason, to=to, **extra)
            return RegistryEntry(kind="rollback", champion=moved, decisions=[line],
                                 writer=_writer())  # fmt: skip

        self._commit(decide)
        return after[0]

    def prune(self) -> list[int]:
        """Keep the newest ``keep`` versions, the champion, its parent and what serving may
        roll back to; delete the rest. Returns the pruned version numbers."""
        doomed: list[VersionRecord] = []

        def decide(state: RegistryState) -> RegistryEntry | None:
            versions = sorted(state.versions)
            protect: set[int] = set()
            champ = state.champion.version
            if champ is not None:
                protect.add(champ)
                rec = state.versions.get(champ)
                if rec is not None and rec.parent is not None:
                    protect.add(rec.parent)
            rs = state.rollout
            if rs is not None:
                protect |= {v for v in (rs.serving, rs.previous) if v is not None}
            cut = versions[: -self.keep] if self.keep > 0 else versions
            doomed[:] = [state.versions[v] for v in cut if v not in protect]
            if not doomed:
                return None
            return RegistryEntry(kind="prune", remove=[r.version for r in doomed],
                                 writer=_writer())  # fmt: skip

        if self._commit(decide) is None:
            return []
        for rec in doomed:  # after the entry: a crash here leaves garbage repair() removes
            self._delete_prefix(rec.prefix)
            self._meta_bytes.pop(rec.version, None)
        self._collect_blobs()
        return [r.version for r in doomed]

    def _collect_blobs(self) -> None:
        if self.storage.local_root is None:  # locally a shared file goes with its last link
            shared.collect(self.storage, self._state(), UPLOADS, self._cache)

    def expecting(self, latest: int | None) -> Registry:
        """A view of this registry whose ``register`` only succeeds while ``latest`` is still
        the latest version: a caller that read its data slice from ``latest`` pins it here, so
        code it hands the view to cannot register on top of a newer version by mistake."""
        return _Pinned(self._location, self.keep, self._storage_cfg, latest)

    # -- start-up repair ------------------------------------------------------------------
    def repair(self, older_than_s: float = REPAIR_GRACE_S) -> list[Decision]:
        """Delete what crashed writers left behind; returns the decisions it wrote (always
        none: a registration and its decision are one log entry, so there is nothing to
        complete).

        Removed: uploads that no live version references (a writer killed before its commit,
        or a prune killed before its deletes) once ``older_than_s`` old, and the temporary
        directories of dead local processes. Idempotent; safe to run from several processes.
        """
        state = self._state()
        live = {r.prefix for r in state.versions.values()}
        now_ms = time.time() * 1000
        for obj in self.storage.list(f"{UPLOADS}/"):
            key = obj.key.rpartition("/")[2]
            born = key.split("-", 1)[0]
            if not born.isdigit() or f"{VERSIONS}/{key}" in live:
                continue
            if now_ms - int(born) < older_than_s * 1000:
                continue  # maybe still being uploaded by a live writer
            log.warning("registry %s: removing unreferenced upload %s", self.location, key)
            self._delete_prefix(f"{VERSIONS}/{key}")
        base = self.storage.local_root or self._cache
        if base is not None and base.is_dir():
            for p in base.glob(f"{_TMP_PREFIX}*"):
                pid = p.name[len(_TMP_PREFIX) :].split("-", 1)[0]
                if pid.isdigit() and not pid_alive(int(pid)):
                    shutil.rmtree(p, ignore_errors=True)
        self._collect_blobs()
        return []

    # -- adopting the older directory layout ---------------------------------------------
    def _adopt_legacy(self, root: Path) -> None:
        self._state()
        if self.log.next_entry > 0:
            return
        dirs = legacy_dirs(root)
        if not dirs and not any((root / n).exists() for n in LEGACY_FILES):
            return
        entry = legacy_entry(root, dirs, _writer())
        # Two processes opening it at once: the first entry wins, the other adopts nothing.
        if self._commit(lambda _: None if self.log.next_entry > 0 else entry) is not None:
            log.warning("registry %s: adopted %d versions of the older layout", root,
                        len(entry.add))  # fmt: skip

    # -- rollout state --------------------------------------------------------------------
    def rollout_state(self) -> RolloutState:
        rs = self._state().rollout
        return RolloutState() if rs is None else rs.model_copy()

    def set_rollout_state(self, state: RolloutState) -> None:
        """Replace the rollout state (written only by the rollout controller)."""
        new = state.model_copy(update={"updated_at": time.time()})
        self._commit(lambda _: RegistryEntry(kind="rollout", rollout=new, writer=_writer()))

    # -- reading --------------------------------------------------------------------------
    def versions(self) -> list[int]:
        """Live versions, oldest first."""
        return sorted(self._state().versions)

    def champion_state(self) -> ChampionState:
        return self._state().champion.model_copy()

    def champion(self) -> int | None:
        return self._state().champion.version

    def latest(self) -> int | None:
        return max(self._state().versions, default=None)

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

    def meta(self, version: int) -> dict[str, Any]:
        """The version's meta.json as a plain dict (see ``version_meta`` for the typed form)."""
        data = self._meta_bytes.get(version)
        if data is None:
            rec = self._record(version)
            try:
                data = self.storage.read(f"{rec.prefix}/{META}")
            except FileNotFoundError:
                raise RegistryIntegrityError(f"version {version}: {META} is missing") from None
            actual = hashlib.sha256(data).hexdigest()
            if actual != rec.files.get(META):
                raise mismatch(version, META, actual, rec.files.get(META, "?"))
            self._meta_bytes[version] = data
        out: dict[str, Any] = json.loads(data)
        return out

    def version_meta(self, version: int) -> VersionMeta:
        return VersionMeta.model_validate(self.meta(version))

    def read_histories(self, version: int) -> pa.Table:
        """Every user's recent items as of ``version`` (what its rounds trained on, up to
        ``meta(version)["watermark"]``): columns user_id (string) and recent (list<string> of
        item ids, oldest first, at most the model's max_len). HistoriesError if the version has
        no index (registered before there was one, or outside a round)."""
        from training import histories

        d = self.path(version)
        return histories.item_histories(d, ItemVocab.load(d / "vocab.json"))

    def decision_log(self) -> list[Decision]:
        return [d.model_copy() for d in self._state().decisions]

    def decisions(self) -> list[dict[str, Any]]:
        """The decision log as plain dicts (``decision_log`` for the typed form)."""
        return [d.model_dump() for d in self.decision_log()]

    def verify(self, version: int) -> dict[str, Any]:
        """Re-hash every file of ``version``; raise RegistryIntegrityError if anything is off."""
        return verify_dir(self._record(version), self.path(version))

    def load(self, version: int | None = None) -> LoadedVersion:
        """Verify and load a version (default: the champion). Read-only."""
        v = version if version is not None else self.champion()
        if v is None:
            raise LookupError(f"registry {self.location} has no champion yet; run a training round")
        meta = self.verify(v)
        d = self.path(v)
        check_finite(d / WEIGHTS)
        from training.model import Recommender

        cfg = ModelConfig(**meta["model_config"])
        model = Recommender.from_file(d / WEIGHTS, cfg)
        model.eval()
        vocab = ItemVocab.load(d / "vocab.json")
        return LoadedVersion(v, model, vocab, meta, d)


class _Pinned(Registry):
    def __init__(
        self,
        location: Path | str,
        keep: int,
        storage: StorageConfig | None,
        latest: int | None,
    ) -> None:
        super().__init__(location, keep, storage)
        self.pinned = latest

    def __reduce__(self) -> tuple[Any, ...]:
        return (_Pinned, (self._portable(), self.keep, self._storage_cfg, self.pinned))

    def register(
        self,
        write: Callable[[Path], None],
        meta: dict[str, Any],
        *,
        promote: bool = False,
        reason: str = "registered outside a training round",
        expect_latest: int | EllipsisType | None = ...,
    ) -> int:
        if expect_latest is not ... and expect_latest != self.pinned:
            raise ConcurrentRoundError(
                f"registry {self.location}: this round was built on version {expect_latest}, "
                f"but its data slice was read after version {self.pinned}; another process "
                "registered in between, so this round is not registered"
            )
        return super().register(
            write, meta, promote=promote, reason=reason, expect_latest=self.pinned
        )
