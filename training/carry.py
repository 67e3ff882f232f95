"""Rejected rounds' training examples, carried forward until a round is promoted.

A rejected round registers its version (the lineage, the replay reservoir and the watermark move
on), but its candidate never serves: without a carry its events would never be trained on. So a
rejected round leaves its own training examples (built from its users' histories at the time, in
rows of the lineage's append-only item map, so they stay valid) in its version, with the offset
span they came from; the next round trains on them again beside its own. A promoted round empties
the carry: the spans it carried are the ones it first trained on.

The carry is bounded (``replay.carry_max_examples``): past it the oldest rejected rounds are let
go whole and reported as ``dropped`` spans, counted as never trained on. Persisted as safetensors
+ JSON, no pickle.

A promoted version keeps what it trained on for the first time the same way (``TRAINED``): if
serving later rolls the champion back past it (a live trial's guard, a click-through rollback, by
hand), its events are in no live version's weights any more, and the next round carries them
like a rejected round's (``merge``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from training.data import Examples

NAME = "carry"
TRAINED = "trained"  # a promoted version's examples, carried again if it is rolled back


@dataclass
class Carry:
    """Examples of rejected rounds since the champion, and one span (a dict) per round."""

    examples: Examples
    spans: list[dict[str, Any]] = field(default_factory=list)
    sizes: list[int] = field(default_factory=list)  # examples per span, in order

    @classmethod
    def empty(cls, max_len: int) -> Carry:
        return cls(Examples.empty(max_len))

    def __len__(self) -> int:
        return len(self.examples)

    @property
    def events(self) -> int:
        return sum(int(s.get("events", 0)) for s in self.spans)

    def add(self, examples: Examples, span: dict[str, Any], cap: int) -> list[dict[str, Any]]:
        """Append a rejected round's examples; returns the spans let go to stay within ``cap``."""
        self.examples = self.examples.concat(examples)
        self.spans.append(span)
        self.sizes.append(len(examples))
        dropped: list[dict[str, Any]] = []
        while self.sizes and len(self) > cap:
            n = self.sizes.pop(0)
            dropped.append(self.spans.pop(0))
            keep = np.arange(n, len(self))
            self.examples = self.examples.take(keep)
        return dropped

    def merge(self, other: Carry) -> int:
        """Add ``other``'s spans that this carry lacks (with their examples), uncapped: the cap
        applies when a round is rejected. Returns the events added."""
        have = {_span_key(s) for s in self.spans}
        start, added = 0, 0
        for span, size in zip(other.spans, other.sizes, strict=True):
            if _span_key(span) not in have:
                rows = np.arange(start, start + size)
                self.examples = self.examples.concat(other.examples.take(rows))
                self.spans.append(span)
                self.sizes.append(size)
                added += int(span.get("events", 0))
            start += size
        return added

    def save(self, directory: Path, name: str = NAME) -> list[Path]:
        tensors = {
            "inputs": torch.from_numpy(np.ascontiguousarray(self.examples.inputs)),
            "targets": torch.from_numpy(np.ascontiguousarray(self.examples.targets)),
        }
        save_file(tensors, str(directory / f"{name}.safetensors"))
        state = {"spans": self.spans, "sizes": self.sizes}
        (directory / f"{name}.json").write_text(json.dumps(state))
        return [directory / f"{name}.safetensors", directory / f"{name}.json"]

    @staticmethod
    def exists(directory: Path | None, name: str = NAME) -> bool:
        return directory is not None and (directory / f"{name}.json").exists()

    @classmethod
    def load(cls, directory: Path, name: str = NAME) -> Carry:
        state = json.loads((directory / f"{name}.json").read_text())
        tensors = load_file(str(directory / f"{name}.safetensors"))
        ex = Examples(tensors["inputs"].numpy(), tensors["targets"].numpy())
        return cls(ex, list(state["spans"]), [int(n) for n in state["sizes"]])


def _span_key(span: dict[str, Any]) -> str:
    """A span's identity: where in the stream it starts and ends."""
    return json.dumps([span.get("after"), span.get("upto")], sort_keys=True)
