"""Every registry fact but a version's registration: the champion pointer, decision lines,
rollbacks, the rollout controller's state, pruning and the start-up repair.

Part of the registry (``training.registry`` documents the layout and the commit protocol). Each
method appends one log entry decided on the freshest state (``RegistryCore._commit``).
"""

from __future__ import annotations

import logging
import shutil
import time
from typing import Any

from training import registry_shared as shared
from training.errors import ConcurrentRoundError
from training.registry_core import (
    REPAIR_GRACE_S,
    TMP_PREFIX,
    UPLOADS,
    VERSIONS,
    RegistryCore,
    writer,
)
from training.registry_files import pid_alive
from training.registry_log import (
    ChampionState,
    Decision,
    RegistryEntry,
    RegistryState,
    RolloutState,
    VersionRecord,
)

log = logging.getLogger(__name__)


class RegistryMoves(RegistryCore):
    """The registry's writes that move pointers and remove versions."""

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
                writer=writer(),
            )

        entry = self._commit(decide)
        assert entry is not None and entry.champion is not None
        self.prune()
        return entry.champion.model_copy()

    def record(self, version: int, decision: str, reason: str, **extra: Any) -> None:
        """Append a decision line (no pointer move), e.g. ``rollback-impossible``."""
        line = Decision(version=version, decision=decision, reason=reason, **extra)
        self._commit(lambda _: RegistryEntry(kind="record", decisions=[line], writer=writer()))

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
                                 writer=writer())  # fmt: skip

        self._commit(decide)
        return after[0]

    def set_rollout_state(self, state: RolloutState) -> None:
        """Replace the rollout state (written only by the rollout controller)."""
        new = state.model_copy(update={"updated_at": time.time()})
        self._commit(lambda _: RegistryEntry(kind="rollout", rollout=new, writer=writer()))

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
                                 writer=writer())  # fmt: skip

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
            for p in base.glob(f"{TMP_PREFIX}*"):
                pid = p.name[len(TMP_PREFIX) :].split("-", 1)[0]
                if pid.isdigit() and not pid_alive(int(pid)):
                    shutil.rmtree(p, ignore_errors=True)
        self._collect_blobs()
        return []
