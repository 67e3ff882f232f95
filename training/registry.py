"""The model registry: immutable, hashed, atomically written versions plus a champion alias.

Layout under ``root`` (this module is the only one that knows it)::

    v000001/ model.safetensors  vocab.json  popularity.json  titles.json
              replay.{safetensors,json}  replay_eval.{safetensors,json}  meta.json  _SUCCESS
    champion.json      {"version": 3, "generation": 7}   (atomic replace)
    decisions.jsonl    one line per promote / reject / rollback, fsync'd
    rollout.json       the rollout controller's state (serving version, rollback target, watch)
    .lock              fcntl lock file: every write below holds it

A version directory appears only by one rename, after every file (``_SUCCESS`` included) and the
directory are fsync'd, so readers never see a partial version. ``meta.json`` holds the sha256 of
every other file; loading re-hashes them and refuses a truncated or tampered version. Weights are
safetensors: nothing here unpickles, and a model with a NaN or infinite weight is refused.

One writer per fact: version numbers, the champion pointer, the decision log and the rollout
state change only under an exclusive ``fcntl`` lock on ``root/.lock`` (a local filesystem is
assumed), and the champion additionally carries a generation number, so a writer that read
generation g can only write g+1 (``expect_generation``). ``register`` checks, under the lock,
that the latest version is still the one the caller built on (``expect_latest``), so two rounds
over the same slice cannot both register.

Registering and deciding is one step with a deterministic repair: the decision (promote or
reject, with its reason and the champion generation it was made against) is written into the
version's own ``meta.json`` before the rename that makes the version visible; the champion move
and the decision line follow. A process killed between the rename and those writes leaves a
version with no decision line, which ``repair()`` (run by the loop at start) completes from its
meta: the decision line is appended and, for a promotion made against the current champion
generation, the champion is moved. If the champion changed in between, the interrupted promotion
is recorded as a rejection, never applied over a newer decision.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import EllipsisType
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field
from safetensors import safe_open

from streams.buffer import atomic_write_bytes, fsync_dir
from training.config import ModelConfig
from training.errors import (
    ConcurrentRoundError,
    NonFiniteWeightsError,
    RegistryError,
    RegistryIntegrityError,
)
from training.vocab import ItemVocab

if TYPE_CHECKING:  # imported lazily at run time: reading the registry needs no torch
    from training.model import Recommender

__all__ = [
    "ChampionState",
    "ConcurrentRoundError",
    "Decision",
    "LoadedVersion",
    "NonFiniteWeightsError",
    "Registry",
    "RegistryError",
    "RegistryIntegrityError",
    "RolloutState",
    "VersionMeta",
]

SUCCESS = "_SUCCESS"
WEIGHTS = "model.safetensors"
_TMP_PREFIX = ".tmp-v-"


class VersionMeta(BaseModel):
    """``meta.json`` of a version. Extra keys (a round's metrics, configs, ...) are kept."""

    model_config = ConfigDict(extra="allow")

    version: int = Field(description="Version number, allocated under the registry lock.")
    created_at: float = Field(description="Unix time the version was registered.")
    files: dict[str, str] = Field(description="sha256 of every file of the version but meta.")
    watermark: dict[str, int] = Field(
        default_factory=dict, description="Buffer offsets the version's training data ends at."
    )
    parent: int | None = Field(default=None, description="Champion the version started from.")
    decision: str | None = Field(
        default=None, description="promote or reject: the decision taken when registered."
    )
    reason: str | None = Field(default=None, description="Why (the gate's reason).")
    base_generation: int | None = Field(
        default=None, description="Champion generation the decision was made against."
    )


class Decision(BaseModel):
    """One line of ``decisions.jsonl``."""

    model_config = ConfigDict(extra="allow")

    ts: float = Field(default_factory=time.time, description="Unix time of the decision.")
    version: int = Field(description="The version decided on.")
    decision: str = Field(description="promote, reject, manual-promote, rollback, ...")
    reason: str = Field(description="Why, in words.")
    to: int | None = Field(default=None, description="Rollback: the version rolled back to.")
    repaired: bool = Field(
        default=False, description="Written by start-up repair after an interrupted register."
    )


class ChampionState(BaseModel):
    """``champion.json``: the champion and how many times the pointer has moved."""

    version: int | None = Field(default=None, description="Champion version; None = none yet.")
    generation: int = Field(default=0, ge=0, description="Incremented by every pointer move.")


class RolloutState(BaseModel):
    """What the rollout controller must remember across restarts (``rollout.json``)."""

    model_config = ConfigDict(extra="forbid")

    serving: int | None = Field(default=None, description="Version Serve was last pointed at.")
    previous: int | None = Field(
        default=None, description="Rollback target of the serving version (None: no target)."
    )
    watch_since: float | None = Field(
        default=None, description="Unix time the serving version's watch window started."
    )
    rollback_impossible: int | None = Field(
        default=None,
        description="Version already recorded as bad with no rollback target (recorded once).",
    )
    updated_at: float = Field(default_factory=time.time, description="Unix time of this state.")


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


def check_finite(weights: Path) -> None:
    """Raise NonFiniteWeightsError if any floating tensor of a safetensors file has NaN/inf."""
    import torch  # imported here: reading the registry (CLI, serving context) needs no torch

    with safe_open(str(weights), framework="pt") as f:
        for name in f.keys():  # noqa: SIM118 - safe_open is not a mapping
            t = f.get_tensor(name)
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                bad = int((~torch.isfinite(t)).sum())
                raise NonFiniteWeightsError(
                    f"{weights.name}: tensor {name!r} has {bad} NaN/inf values; a model with "
                    "non-finite weights is never registered"
                )


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Registry:
    def __init__(self, root: Path, keep: int = 10) -> None:
        self.root = root
        self.keep = keep
        self.root.mkdir(parents=True, exist_ok=True)

    # -- the lock -------------------------------------------------------------------------
    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Exclusive across processes and threads (each acquisition opens its own descriptor,
        and flock locks of distinct open files exclude each other even within a process)."""
        fd = os.open(self.root / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the lock

    # -- writing ------------------------------------------------------------------------
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
        champion to the new version; either way a decision line (promote/reject + ``reason``)
        is appended. ``expect_latest``: the latest version the caller built on (None = the
        registry was empty); if another writer registered since, ConcurrentRoundError is raised
        and nothing becomes visible. Leave it out (``...``) to skip that check.
        """
        tmp = self.root / f"{_TMP_PREFIX}{os.getpid()}-{uuid.uuid4().hex}"
        tmp.mkdir()
        try:
            write(tmp)
            if not (tmp / WEIGHTS).exists():
                raise RegistryError(f"a version needs {WEIGHTS}; write() did not create it")
            check_finite(tmp / WEIGHTS)
            files = sorted(p.name for p in tmp.iterdir() if p.is_file())
            digests = {name: _sha256(tmp / name) for name in files}
            for name in files:
                _fsync_file(tmp / name)
            with self._locked():
                self._repair_locked()  # an earlier writer's interrupted decision comes first
                latest = self.latest()
                if expect_latest is not ... and latest != expect_latest:
                    raise ConcurrentRoundError(
                        f"registry {self.root}: latest version is {latest}, this round was built "
                        f"on {expect_latest}; another process registered first, so this round "
                        "is not registered"
                    )
                champ = self.champion_state()
                version = self._next_version()
                full = VersionMeta.model_validate(
                    {
                        **meta,
                        "version": version,
                        "created_at": time.time(),
                        "files": digests,
                        "decision": "promote" if promote else "reject",
                        "reason": reason,
                        "base_generation": champ.generation,
                    }
                )
                (tmp / "meta.json").write_text(full.model_dump_json(indent=1))
                (tmp / SUCCESS).write_text(digests[WEIGHTS])
                for name in ("meta.json", SUCCESS):
                    _fsync_file(tmp / name)
                fsync_dir(tmp)
                final = self.path(version)
                os.rename(tmp, final)  # the commit point: the version and its decision
                fsync_dir(self.root)
                self._apply_decision(full, champ, repaired=False)
            return version
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _apply_decision(self, meta: VersionMeta, champ: ChampionState, repaired: bool) -> None:
        """Champion move (if a promotion still applies) and the decision line. Under the lock."""
        decision, reason = meta.decision or "reject", meta.reason or ""
        if decision == "promote" and champ.version != meta.version:
            if meta.base_generation is not None and champ.generation == meta.base_generation:
                self._write_champion(meta.version, expect_generation=champ.generation)
            else:
                decision = "reject"
                reason = (
                    f"promotion interrupted and superseded: the champion moved to "
                    f"{champ.version} (generation {champ.generation}) before it was applied; "
                    f"gate said: {reason}"
                )
        self._append(Decision(version=meta.version, decision=decision, reason=reason,
                              repaired=repaired))  # fmt: skip
        if decision == "promote":
            self._prune()

    def _next_version(self) -> int:
        """Every number ever used is skipped, incomplete directories included."""
        existing = [int(p.name[1:]) for p in self.root.glob("v[0-9]*") if p.name[1:].isdigit()]
        return max(existing, default=0) + 1

    def _write_champion(self, version: int | None, expect_generation: int) -> ChampionState:
        """Compare-and-swap of the champion pointer. Under the lock."""
        cur = self.champion_state()
        if cur.generation != expect_generation:
            raise ConcurrentRoundError(
                f"champion generation is {cur.generation}, expected {expect_generation}: "
                "another writer moved the champion"
            )
        new = ChampionState(version=version, generation=cur.generation + 1)
        atomic_write_bytes(self.root / "champion.json", new.model_dump_json().encode())
        return new

    def _append(self, d: Decision) -> None:
        with (self.root / "decisions.jsonl").open("a") as fh:
            fh.write(d.model_dump_json(exclude_defaults=False) + "\n")
            fh.flush()
            os.fsync(fh.fileno())

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
        with self._locked():
            gen = self.champion_state().generation
            new = self._write_champion(
                version, gen if expect_generation is None else expect_generation
            )
            self._append(Decision(version=version, decision=decision, reason=reason))
            self._prune()
        return new

    def record(self, version: int, decision: str, reason: str, **extra: Any) -> None:
        """Append a decision line (no pointer move), e.g. ``rollback-impossible``."""
        with self._locked():
            self._append(Decision(version=version, decision=decision, reason=reason, **extra))

    def mark_rolled_back(self, version: int, reason: str, to: int | None) -> ChampionState:
        """Serving saw ``version`` misbehave: point the champion back at ``to`` and say why.

        The pointer moves only while ``version`` is still the champion: a newer decision (a
        round that promoted something else meanwhile) is never overwritten by a rollback.
        """
        with self._locked():
            cur = self.champion_state()
            extra: dict[str, Any] = {}
            if to is not None and cur.version == version:
                cur = self._write_champion(to, expect_generation=cur.generation)
            elif to is not None:
                extra["champion_kept"] = cur.version
            self._append(Decision(version=version, decision="rollback", reason=reason, to=to,
                                  **extra))  # fmt: skip
            return cur

    def prune(self) -> list[int]:
        """Keep the newest ``keep`` versions, the champion, its parent and what serving may
        roll back to; delete the rest."""
        with self._locked():
            return self._prune()

    def _prune(self) -> list[int]:
        versions = self.versions()
        champ = self.champion()
        protect: set[int] = set()
        if champ:
            protect.add(champ)
            parent = self.meta(champ).get("parent")
            if parent:
                protect.add(int(parent))
        rs = self.rollout_state()
        protect |= {v for v in (rs.serving, rs.previous) if v is not None}
        doomed = [v for v in versions[: -self.keep] if v not in protect]
        for v in doomed:
            shutil.rmtree(self.path(v), ignore_errors=True)
        return doomed

    def expecting(self, latest: int | None) -> Registry:
        """A view of this registry whose ``register`` only succeeds while ``latest`` is still
        the latest version: a caller that read its data slice from ``latest`` pins it here, so
        code it hands the view to cannot register on top of a newer version by mistake."""
        return _Pinned(self.root, self.keep, latest)

    # -- start-up repair ------------------------------------------------------------------
    def repair(self) -> list[Decision]:
        """Complete registrations a crash interrupted; returns the decisions it wrote.

        A complete version with no decision line gets the one stored in its meta.json (see the
        module docstring); leftover temporary directories of dead writers are removed. Idempotent
        and deterministic: running it twice, or from two processes, writes each line once.
        """
        with self._locked():
            return self._repair_locked()

    def _repair_locked(self) -> list[Decision]:
        # Under the lock a registration is never half-way (rename and decision happen within one
        # hold), so any undecided version seen here was interrupted by a dead process.
        written: list[Decision] = []
        for p in self.root.glob(f"{_TMP_PREFIX}*"):
            pid = p.name[len(_TMP_PREFIX) :].split("-", 1)[0]
            if pid.isdigit() and not _pid_alive(int(pid)):
                shutil.rmtree(p, ignore_errors=True)
        decided = {d.version for d in self.decision_log()}
        for v in self.versions():
            if v in decided:
                continue
            try:
                meta = self.version_meta(v)
            except (OSError, ValueError):
                continue  # unreadable: verify() reports it to whoever loads it
            if meta.decision is None:
                # Registered before decisions lived in meta: nothing to complete from.
                meta = meta.model_copy(update={
                    "decision": "reject",
                    "reason": "registered without a recorded decision (older registry)",
                })  # fmt: skip
            self._apply_decision(meta, self.champion_state(), repaired=True)
            written.append(self.decision_log()[-1])
        return written

    # -- rollout state --------------------------------------------------------------------
    def rollout_state(self) -> RolloutState:
        try:
            return RolloutState.model_validate_json((self.root / "rollout.json").read_text())
        except FileNotFoundError:
            return RolloutState()

    def set_rollout_state(self, state: RolloutState) -> None:
        """Atomically replace the rollout state (written only by the rollout controller)."""
        state = state.model_copy(update={"updated_at": time.time()})
        with self._locked():
            atomic_write_bytes(self.root / "rollout.json", state.model_dump_json().encode())

    # -- reading ------------------------------------------------------------------------
    def versions(self) -> list[int]:
        """Complete versions (with their success marker), oldest first."""
        return sorted(
            int(p.name[1:])
            for p in self.root.glob("v[0-9]*")
            if p.name[1:].isdigit() and (p / SUCCESS).exists()
        )

    def champion_state(self) -> ChampionState:
        try:
            raw = json.loads((self.root / "champion.json").read_text())
        except FileNotFoundError:
            return ChampionState()
        return ChampionState.model_validate(raw)  # an older file without generation reads as 0

    def champion(self) -> int | None:
        return self.champion_state().version

    def latest(self) -> int | None:
        vs = self.versions()
        return vs[-1] if vs else None

    def path(self, version: int) -> Path:
        return self.root / f"v{version:06d}"

    def meta(self, version: int) -> dict[str, Any]:
        """The version's meta.json as a plain dict (see ``version_meta`` for the typed form)."""
        data: dict[str, Any] = json.loads((self.path(version) / "meta.json").read_text())
        return data

    def version_meta(self, version: int) -> VersionMeta:
        return VersionMeta.model_validate(self.meta(version))

    def decision_log(self) -> list[Decision]:
        try:
            lines = (self.root / "decisions.jsonl").read_text().splitlines()
        except FileNotFoundError:
            return []
        out: list[Decision] = []
        for line in lines:
            if not line.strip():
                continue
            try:
                out.append(Decision.model_validate_json(line))
            except ValueError:
                continue  # a torn last line of a crashed append: the repair re-derives it
        return out

    def decisions(self) -> list[dict[str, Any]]:
        """The decision log as plain dicts (``decision_log`` for the typed form)."""
        return [d.model_dump() for d in self.decision_log()]

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
        from training.model import Recommender

        cfg = ModelConfig(**meta["model_config"])
        model = Recommender.from_file(d / WEIGHTS, cfg)
        model.eval()
        vocab = ItemVocab.load(d / "vocab.json")
        return LoadedVersion(v, model, vocab, meta, d)


class _Pinned(Registry):
    def __init__(self, root: Path, keep: int, latest: int | None) -> None:
        super().__init__(root, keep)
        self.pinned = latest

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
                f"registry {self.root}: this round was built on version {expect_latest}, but its "
                f"data slice was read after version {self.pinned}; another process registered "
                "in between, so this round is not registered"
            )
        return super().register(
            write, meta, promote=promote, reason=reason, expect_latest=self.pinned
        )
