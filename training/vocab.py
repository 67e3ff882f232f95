"""ItemVocab: external item ids <-> embedding rows. Rows only ever get appended.

Row 0 is padding; an item keeps its row for the life of the lineage, so a model trained in an
earlier round stays valid for the items it knew when the catalog grows.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path


class ItemVocab:
    PAD = 0

    def __init__(self, items: Iterable[str] = ()) -> None:
        self._ids: list[str] = ["<pad>"]
        self._index: dict[str, int] = {}
        self.add(items)

    def __len__(self) -> int:
        """Rows including padding (the embedding table's size)."""
        return len(self._ids)

    @property
    def n_items(self) -> int:
        return len(self._ids) - 1

    def add(self, items: Iterable[str]) -> list[str]:
        """Append unseen items in order; returns the ones that were new."""
        new = []
        for item in items:
            if item not in self._index:
                self._index[item] = len(self._ids)
                self._ids.append(item)
                new.append(item)
        return new

    def index(self, item: str) -> int | None:
        return self._index.get(item)

    def encode(self, items: Iterable[str]) -> list[int]:
        """Rows of known items; unknown ones are dropped (they cannot be scored)."""
        return [i for i in (self._index.get(x) for x in items) if i is not None]

    def item(self, row: int) -> str:
        if not 0 < row < len(self._ids):
            raise IndexError(f"row {row} is not an item row (1..{len(self._ids) - 1})")
        return self._ids[row]

    def items(self) -> list[str]:
        return self._ids[1:]

    def to_json(self) -> str:
        return json.dumps({"v": 1, "items": self._ids[1:]})

    @classmethod
    def from_json(cls, text: str) -> ItemVocab:
        data = json.loads(text)
        if (
            not isinstance(data, dict)
            or data.get("v") != 1
            or not isinstance(data.get("items"), list)
        ):
            raise ValueError("not an ItemVocab v1 document")
        return cls(data["items"])

    def save(self, path: Path) -> None:
        path.write_text(self.to_json())

    @classmethod
    def load(cls, path: Path) -> ItemVocab:
        return cls.from_json(path.read_text())
