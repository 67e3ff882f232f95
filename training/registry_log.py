"""The registry's typed contracts: a version's ``meta.json``, the decision log's lines, the champion
pointer, the rollout state, and the commit-log entries and state every reader folds them into.

Where these live (the file layout) is ``training.registry``'s alone; this module is the shape of
what it writes.
"""

from __future__ import annotations

import time
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from training.sequential import SequentialState


class VersionMeta(BaseModel):
    """``meta.json`` of a version. Extra keys (a round's metrics, configs, ...) are kept."""

    model_config = ConfigDict(extra="allow")

    version: int = Field(description="Version number, allocated by the log entry naming it.")
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
    """One line of the decision log."""

    model_config = ConfigDict(extra="allow")

    ts: float = Field(default_factory=time.time, description="Unix time of the decision.")
    version: int = Field(description="The version decided on.")
    decision: str = Field(description="promote, reject, manual-promote, rollback, ...")
    reason: str = Field(description="Why, in words.")
    to: int | None = Field(default=None, description="Rollback: the version rolled back to.")
    repaired: bool = Field(
        default=False,
        description="Not decided by its writer: completed afterwards (older-layout adoption).",
    )


class ChampionState(BaseModel):
    """The champion and how many times the pointer has moved."""

    version: int | None = Field(default=None, description="Champion version; None = none yet.")
    generation: int = Field(default=0, ge=0, description="Incremented by every pointer move.")


class RolloutState(BaseModel):
    """What the rollout controller must remember across restarts."""

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
    live: list[tuple[int, float]] = Field(
        default_factory=list,
        description="(version, Unix time) of the latest rollouts, once each served: how fresh "
        "the events a version first trained on were when they went live.",
    )
    trial: LiveTrial | None = Field(
        default=None, description="The live trial running now (rollout.live), if any."
    )
    baseline: int | None = Field(
        default=None,
        description="guard: the last live-verified version, the one the serving lineage is "
        "interleaved with and rolled back to if it wins.",
    )
    baseline_since: float | None = Field(
        default=None, description="Unix time the baseline became the baseline."
    )
    paused_until: float | None = Field(
        default=None,
        description="Unix time until which new champions are not rolled out (a guard rollback "
        "paused promotions).",
    )
    paused_reason: str | None = Field(default=None, description="Why promotions are paused.")
    updated_at: float = Field(default_factory=time.time, description="Unix time of this state.")


class LiveTrial(BaseModel):
    """Two versions interleaved on live traffic and the sequential test between them.

    Team "a" is the fixed side (guard: the baseline; canary: the serving champion), team "b" the
    side that moves (guard: the serving champion; canary: the newest candidate): each new version
    of b's lineage joins the trial and its impressions are pooled with its predecessors'.
    """

    model_config = ConfigDict(extra="forbid")

    id: str = Field(description="Unique id; interleaved answers carry it, clicks credit it.")
    mode: Literal["guard", "canary"] = Field(description="Which rollout.live mode started it.")
    a: int = Field(description="Version of team a, the fixed side.")
    b: int = Field(description="Newest version of team b's lineage.")
    b_versions: list[int] = Field(description="Every version team b has had, oldest first.")
    share: float = Field(ge=0, le=1, description="Share of /recommend answers interleaved.")
    started_at: float = Field(default_factory=time.time, description="Unix time it started.")
    test: SequentialState = Field(
        default_factory=SequentialState, description="Impressions counted and the test's state."
    )
    counted: dict[str, list[int]] = Field(
        default_factory=dict,
        description="Per history shard, the (a wins, b wins, ties, clicks credited to a, to b) "
        "already counted: a shard's running totals minus these are still to count.",
    )
    a_clicks: int = Field(
        default=0, ge=0, description="Clicks credited to team a's items in settled impressions."
    )
    b_clicks: int = Field(
        default=0, ge=0, description="Clicks credited to team b's items in settled impressions."
    )


RolloutState.model_rebuild()  # its ``trial`` names LiveTrial, defined after it


class VersionRecord(BaseModel):
    """A live version as the log knows it: where its files are and what they hash to."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    version: int = Field(ge=1, description="The version number.")
    prefix: str = Field(description="Key prefix of its files under the registry's location.")
    files: dict[str, str] = Field(description="sha256 of every file, meta.json included.")
    parent: int | None = Field(default=None, description="Champion it started from (meta's).")


class RegistryEntry(BaseModel):
    """One commit-log entry: everything it changes becomes visible together."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["register", "champion", "record", "rollback", "rollout", "prune", "adopt"] = (
        Field(description="What the entry is, for people reading the log.")
    )
    add: list[VersionRecord] = Field(default=[], description="Versions made visible.")
    remove: list[int] = Field(default=[], description="Versions pruned (files deleted after).")
    champion: ChampionState | None = Field(
        default=None, description="The champion pointer's new value (None: unchanged)."
    )
    decisions: list[Decision] = Field(default=[], description="Decision lines appended.")
    rollout: RolloutState | None = Field(
        default=None, description="The rollout controller's new state (None: unchanged)."
    )
    next_version: int = Field(
        default=0, ge=0, description="Adoption: first number the older layout never used."
    )
    writer: str = Field(default="", description="Who appended it (host:pid).")
    ts: float = Field(default_factory=time.time, description="Unix time it was decided.")


class RegistryState(BaseModel):
    """The registry as of a log entry."""

    versions: dict[int, VersionRecord] = Field(default={}, description="Live versions.")
    next_version: int = Field(default=1, ge=1, description="Never reused, pruned ones included.")
    champion: ChampionState = Field(default_factory=ChampionState, description="The alias.")
    decisions: list[Decision] = Field(default=[], description="The decision log, oldest first.")
    rollout: RolloutState | None = Field(default=None, description="None: never written.")


def apply_entry(state: RegistryState, e: RegistryEntry) -> RegistryState:
    # A new state per entry, never a mutation: a caller (another thread) may still be reading
    # the previous one outside the lock.
    versions = dict(state.versions)
    for v in e.remove:
        versions.pop(v, None)
    next_version = max(state.next_version, e.next_version)
    for rec in e.add:
        versions[rec.version] = rec
        next_version = max(next_version, rec.version + 1)
    return RegistryState.model_construct(
        versions=versions,
        next_version=next_version,
        champion=e.champion if e.champion is not None else state.champion,
        decisions=[*state.decisions, *e.decisions],
        rollout=e.rollout if e.rollout is not None else state.rollout,
    )
