"""What a version holds for its readers, and the one place that names those files.

Part of the registry (``training.registry``): a round's ``write`` callback, the benchmarks that
register versions of their own, and every reader (the next round's lineage, the serving replicas,
``streamtune eval``) go through ``write_content`` and ``read_content`` / ``Registry.content``,
never through file names. The replay reservoirs, the carry and the gate's recent questions save
themselves beside these (their own modules name their files); the per-user history index is
``training.histories``'.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from training.registry_files import WEIGHTS
from training.vocab import ItemVocab

if TYPE_CHECKING:  # reading a version's content (CLI, serving context) needs no torch
    from training.model import Recommender

VOCAB = "vocab.json"
POPULARITY = "popularity.json"
TITLES = "titles.json"


@dataclass(frozen=True)
class VersionContent:
    """A version's item vocabulary (row -> item id), each row's event count (``popularity``,
    as long as the vocabulary) and the titles it knows (item id -> title)."""

    vocab: ItemVocab
    popularity: list[int] = field(default_factory=list)
    titles: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.popularity and len(self.popularity) != len(self.vocab):
            raise ValueError(
                f"popularity has {len(self.popularity)} rows, the vocabulary {len(self.vocab)}"
            )


def write_content(d: Path, model: Recommender, content: VersionContent) -> None:
    """The weights and ``content`` into a version's upload directory ``d``."""
    from training.model import save_weights

    save_weights(model, d / WEIGHTS)
    content.vocab.save(d / VOCAB)
    (d / POPULARITY).write_text(json.dumps(content.popularity or [0] * len(content.vocab)))
    (d / TITLES).write_text(json.dumps(content.titles))


def read_vocab(d: Path) -> ItemVocab:
    return ItemVocab.load(d / VOCAB)


def read_popularity(d: Path, rows: int) -> list[int]:
    """Each of ``rows`` vocabulary rows' event count; zeros for a version written before
    popularity was kept."""
    popularity = [0] * rows
    if (d / POPULARITY).exists():
        counts = json.loads((d / POPULARITY).read_text())[:rows]
        popularity[: len(counts)] = counts
    return popularity


def read_content(d: Path) -> VersionContent:
    """A version's content from its (verified) directory. Versions written before popularity
    or titles were kept read as zero counts and no titles."""
    vocab = read_vocab(d)
    titles = json.loads((d / TITLES).read_text()) if (d / TITLES).exists() else {}
    return VersionContent(vocab, read_popularity(d, len(vocab)), titles)
