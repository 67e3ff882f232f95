"""An append-only commit log on any ``Storage``: the one place a shared fact changes.

Entry ``n`` is the object ``<prefix>/<n:020d>.json``, created with a create-only write, so of all
writers that try to append entry ``n`` exactly one succeeds (an ``If-None-Match: *`` PUT on an
object store, an exclusive ``link`` on a local disk). A writer builds its entry on the state folded
from entries ``0..n-1``; if another writer took ``n`` first it reads that entry, re-checks its
intent against the new state and tries ``n+1``. This is the protocol Delta Lake uses on object
stores with conditional PUT, and what makes the buffer's fences and the registry's version numbers
single-writer without a lock service.

Entries are never rewritten or deleted, so a reader that knows entry ``n`` only ever has to probe
``n+1`` onwards. Every ``checkpoint_every`` entries the writer of the entry also stores the folded
state (``<n>.checkpoint.json``) and points ``_latest`` at it, so a cold reader reads one checkpoint
and the few entries after it instead of the whole history.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Generic, TypeVar

from pydantic import BaseModel

from streams.storage import Storage

S = TypeVar("S", bound=BaseModel)  # the folded state
E = TypeVar("E", bound=BaseModel)  # one entry


class CommitLog(Generic[S, E]):
    """A log of pydantic entries folded into a pydantic state by ``apply``.

    ``apply(state, entry)`` must be a pure function returning the new state; it runs on every
    reader, so every process folds the same entries into the same state.
    """

    def __init__(
        self,
        storage: Storage,
        prefix: str,
        state_type: type[S],
        entry_type: type[E],
        apply: Callable[[S, E], S],
        checkpoint_every: int = 100,
    ) -> None:
        self.storage = storage
        self.prefix = prefix.rstrip("/")
        self._state_type = state_type
        self._entry_type = entry_type
        self._apply = apply
        self.checkpoint_every = checkpoint_every
        self._state: S = state_type()
        self._next = 0  # the first entry not yet folded into _state
        self._cold = True
        # One log object is shared by threads (ingest, the loop and the gauges share a buffer):
        # two refreshes folding the same entry would skip the next one.
        self._lock = threading.RLock()

    def _key(self, n: int, kind: str = "json") -> str:
        return f"{self.prefix}/{n:020d}.{kind}"

    @property
    def next_entry(self) -> int:
        """The number the next appended entry will get, as of the last ``refresh``."""
        return self._next

    def refresh(self) -> S:
        """Fold every entry written since the last call; returns the current state."""
        with self._lock:
            return self._refresh()

    def _refresh(self) -> S:
        if self._cold:
            self._start_from_checkpoint()
            self._cold = False
        while True:
            try:
                raw = self.storage.read(self._key(self._next))
            except FileNotFoundError:
                return self._state
            self._fold(self._entry_type.model_validate_json(raw))

    def append(self, make: Callable[[S], E | None]) -> tuple[E, int] | None:
        """Append ``make(state)`` as the next entry, re-deciding on the new state when beaten.

        ``make`` sees the freshest state and returns the entry to write, or None to write nothing
        (its intent no longer holds). Returns the written entry and its number, or None.
        """
        with self._lock:
            return self._append(make)

    def _append(self, make: Callable[[S], E | None]) -> tuple[E, int] | None:
        state = self._refresh()
        while True:
            entry = make(state)
            if entry is None:
                return None
            n = self._next
            if self.storage.create(self._key(n), entry.model_dump_json().encode()):
                self._fold(entry)
                if n > 0 and n % self.checkpoint_every == 0:
                    self._checkpoint(n)
                return entry, n
            state = self._refresh()  # someone else wrote entry n: fold it and decide again

    def _fold(self, entry: E) -> None:
        self._state = self._apply(self._state, entry)
        self._next += 1

    def _checkpoint(self, n: int) -> None:
        # The state *after* entry n; derived data, so a plain write is fine (same bytes for all).
        self.storage.write(self._key(n, "checkpoint.json"), self._state.model_dump_json().encode())
        self.storage.write(f"{self.prefix}/_latest", str(n).encode())

    def _start_from_checkpoint(self) -> None:
        try:
            n = int(self.storage.read(f"{self.prefix}/_latest").decode())
            raw = self.storage.read(self._key(n, "checkpoint.json"))
        except (FileNotFoundError, ValueError):
            return  # no checkpoint yet: fold from entry 0
        self._state = self._state_type.model_validate_json(raw)
        self._next = n + 1
