"""What a round continues from: the latest version's state, kept in memory between rounds.

A round starts from the latest registered version (its item map, titles, popularity counts,
replay reservoirs, recent gate questions and carry) and from the champion's weights, and
registers the next version's. Versions never change once registered, so what a round wrote is
exactly what the next round would read back: a process that runs round after round keeps it
(``keep``) instead of reading and re-hashing it (``read``) every round, ~0.1-0.3 s of a round of
~1.5 s on two busy cores. The kept state is handed to one round at a time (``take`` removes it),
so a round that fails half way, after changing it, leaves nothing behind; and it is used only if
the registry's latest version and champion are still the ones it was kept for (another writer,
a restart or a new registry at the same path read from storage again).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

from training.carry import TRAINED, Carry
from training.config import ModelConfig
from training.questions import RecentQuestions
from training.registry import LoadedVersion, Registry, VersionContent
from training.replay import Reservoir
from training.vocab import ItemVocab

log = logging.getLogger(__name__)


@dataclass
class Lineage:
    """The state a round reads from the latest version (``base``) and the champion."""

    base: int | None
    champion: LoadedVersion | None
    vocab: ItemVocab  # the item map: one append-only lineage across every version
    titles: dict[str, str]
    popularity: list[int]  # interactions per row so far (serving's fallback)
    carry: Carry  # rejected rounds' examples since the champion, trained on again
    recent: RecentQuestions  # earlier rounds' held-out questions, for a small round's gate
    reservoir: Reservoir  # replayed training sequences
    probes: Reservoir  # held-out questions measuring forgetting


_Key = tuple[str, int | None, float | None, int | None, str]
_kept: tuple[_Key, Lineage] | None = None
_lock = threading.Lock()


def _key(registry: Registry, base: int | None, champion: int | None, settings: str) -> _Key:
    # created_at tells a version from one of the same number in a registry made anew at the
    # same place; the settings, one round's reservoir size from another's.
    created = registry.meta(base).get("created_at") if base is not None else None
    return (registry.location, base, created, champion, settings)


def take(
    registry: Registry, base: int | None, champion: int | None, settings: str
) -> Lineage | None:
    """The state kept for this registry's ``base`` and ``champion`` under ``settings`` (the
    round's replay and gate settings as JSON), removed from the keep; None if there is none."""
    global _kept
    key = _key(registry, base, champion, settings)
    with _lock:
        kept, _kept = _kept, None
    return kept[1] if kept is not None and kept[0] == key else None


def keep(registry: Registry, lineage: Lineage, settings: str) -> None:
    """Keep what a round registered (as ``lineage.base``) for the next round of this process."""
    global _kept
    champion = lineage.champion.version if lineage.champion is not None else None
    key = _key(registry, lineage.base, champion, settings)
    with _lock:
        _kept = (key, lineage)


def rolled_back(registry: Registry, champion: int, base: int, carry: Carry) -> None:
    """Into ``carry``: the examples of versions after the champion that were promoted (so they
    kept what they trained on) and are no longer the champion's: rolled back past. Their events
    are in no serving version's weights now; the next round trains them again."""
    for v in registry.versions():
        # the meta first: a rejected version has no such file, and on an object store
        # ``path`` downloads the whole version
        if champion < v <= base and registry.meta(v).get("decision") == "promote":
            d = registry.path(v)
            if Carry.exists(d, TRAINED):
                added = carry.merge(Carry.load(d, TRAINED))
                if added:
                    log.info("carrying v%d's %d events forward: rolled back past", v, added)


def read(
    registry: Registry,
    base: int | None,
    champion: int | None,
    model_cfg: ModelConfig,
    capacity: int,
    probes: int,
    recent: int,
    seed: int,
) -> Lineage:
    """The state from storage: ``base`` verified, the champion loaded (``Registry.load``);
    empty parts where there is no version yet. ``capacity``, ``probes``, ``recent``: the replay
    reservoir's, the forgetting probes' and the recent questions' sizes; ``seed``: the
    reservoirs' seed when they start empty."""
    champ = registry.load(champion) if champion is not None else None
    max_len = (champ.model.cfg if champ else model_cfg).max_len
    d = None
    content = VersionContent(ItemVocab())
    if base is not None:
        content = registry.content(base)
        d = registry.path(base)
    # Whether a carry applies (only with a champion to train it from) is the round's to say.
    carry = Carry.load(d) if d is not None and Carry.exists(d) else Carry.empty(max_len)
    if champion is not None and base is not None:
        rolled_back(registry, champion, base, carry)
    return Lineage(
        base=base,
        champion=champ,
        vocab=content.vocab,
        titles=content.titles,
        popularity=content.popularity,
        carry=carry,
        recent=(
            RecentQuestions.load(d, recent)
            if d is not None and RecentQuestions.exists(d)
            else RecentQuestions(recent, max_len)
        ),
        reservoir=(
            Reservoir.load(d, capacity)
            if d is not None and Reservoir.exists(d)
            else Reservoir(capacity, max_len, seed)
        ),
        probes=(
            Reservoir.load(d, probes, name="replay_eval")
            if d is not None and Reservoir.exists(d, name="replay_eval")
            else Reservoir(probes, max_len, seed + 1)
        ),
    )
