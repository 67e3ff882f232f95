"""The model registry: immutable, hashed versions, a champion alias, a decision log and the
rollout state, on a local directory or an object-store prefix (``s3://``, ``gs://``, ``az://``).

Layout under the registry's location (the ``registry_*`` modules are the only ones that know it:
``registry_core`` the log and a version's files on disk, ``registry_write`` registration,
``registry_moves`` every other fact, ``registry_files`` the checks on a version's files,
``registry_shared`` the files versions share, ``registry_log`` the log's typed entries,
``registry_content`` what a version holds for its readers: ``write_content`` / ``content``)::

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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import EllipsisType
from typing import TYPE_CHECKING, Any

from streams.storage import StorageConfig
from training.config import ModelConfig
from training.errors import (
    ConcurrentRoundError,
    NonFiniteWeightsError,
    RegistryError,
    RegistryIntegrityError,
    UnknownVersionError,
)
from training.registry_content import (
    VersionContent,
    read_content,
    read_popularity,
    read_vocab,
    write_content,
)
from training.registry_files import META, WEIGHTS, check_finite, mismatch
from training.registry_log import (
    ChampionState,
    Decision,
    LiveTrial,
    RegistryEntry,
    RegistryState,
    RolloutState,
    VersionMeta,
    VersionRecord,
)
from training.registry_write import RegistryWrites
from training.vocab import ItemVocab

if TYPE_CHECKING:  # imported lazily at run time: reading the registry needs no torch
    import pyarrow as pa

    from training.histories import CodedHistories
    from training.model import Recommender

__all__ = [
    "ChampionState",
    "ConcurrentRoundError",
    "Decision",
    "LiveTrial",
    "LoadedVersion",
    "NonFiniteWeightsError",
    "Registry",
    "RegistryEntry",
    "RegistryError",
    "RegistryIntegrityError",
    "RegistryState",
    "RolloutState",
    "UnknownVersionError",
    "VersionContent",
    "VersionMeta",
    "VersionRecord",
    "write_content",
]


@dataclass(frozen=True)
class LoadedVersion:
    version: int
    model: Recommender
    vocab: ItemVocab
    meta: dict[str, Any]
    path: Path
    popularity: list[int]  # each vocabulary row's event count


class Registry(RegistryWrites):
    """The registry at a local path or an object-store URI (``storage``: how to reach it):
    versions registered, decided and promoted in one step, and read back verified."""

    def __reduce__(self) -> tuple[Any, ...]:
        # Sent to Ray tasks: rebuilt from where it is (a fresh log reader and lock there).
        return (Registry, (self._portable(), self.keep, self._storage_cfg))

    def versions(self) -> list[int]:
        """Live versions, oldest first."""
        return sorted(self._state().versions)

    def champion_state(self) -> ChampionState:
        return self._state().champion.model_copy()

    def champion(self) -> int | None:
        return self._state().champion.version

    def latest(self) -> int | None:
        return max(self._state().versions, default=None)

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

    def read_histories(
        self, version: int, keep: Callable[[pa.Array], pa.Array] | None = None
    ) -> pa.Table:
        """Every user's recent items as of ``version`` (what its rounds trained on, up to
        ``meta(version)["watermark"]``): columns user_id (string) and recent (list<string> of
        item ids, oldest first, at most the model's max_len); ``keep`` masks the users wanted,
        given their ids. HistoriesError if the version has no index (registered before there
        was one, or outside a round)."""
        from training import histories

        d = self.path(version)
        return histories.item_histories(d, read_vocab(d), keep)

    def read_coded_histories(
        self, version: int, keep: Callable[[pa.Array], pa.Array] | None = None
    ) -> CodedHistories:
        """``read_histories`` as codes into the version's item ids, no string per item (what a
        serving shard loads at 1M users)."""
        from training import histories

        d = self.path(version)
        return histories.coded_histories(d, read_vocab(d), keep)

    def decision_log(self) -> list[Decision]:
        return [d.model_copy() for d in self._state().decisions]

    def decisions(self) -> list[dict[str, Any]]:
        """The decision log as plain dicts (``decision_log`` for the typed form)."""
        return [d.model_dump() for d in self.decision_log()]

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
        # No titles: a replica loads every version, and serving never reads them.
        vocab = read_vocab(d)
        return LoadedVersion(v, model, vocab, meta, d, read_popularity(d, len(vocab)))

    def content(self, version: int, verify: bool = True) -> VersionContent:
        """A version's vocabulary, popularity and titles (no model built), its files re-hashed
        first unless ``verify`` is False (a hint that is not trained or served from)."""
        if verify:
            self.verify(version)
        return read_content(self.path(version))

    def rollout_state(self) -> RolloutState:
        rs = self._state().rollout
        return RolloutState() if rs is None else rs.model_copy()

    def expecting(self, latest: int | None) -> Registry:
        """A view of this registry whose ``register`` only succeeds while ``latest`` is still
        the latest version: a caller that read its data slice from ``latest`` pins it here, so
        code it hands the view to cannot register on top of a newer version by mistake."""
        return _Pinned(self._location, self.keep, self._storage_cfg, latest)


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
