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

    def save(self, directory: Path) -> list[Path]:
        tensors = {
            "inputs": torch.from_numpy(np.ascontiguousarray(self.examples.inputs)),
            "targets": torch.from_numpy(np.ascontiguousarray(self.examples.targets)),
        }
        save_file(tensors, str(directory / f"{NAME}.safetensors"))
        state = {"spans": self.spans, "sizes": self.sizes}
        (directory / f"{NAME}.json").write_text(json.dumps(state))
        return [directory / f"{NAME}.safetensors", directory / f"{NAME}.json"]

    @staticmethod
    def exists(directory: Path | None) -> bool:
        return directory is not None and (directory / f"{NAME}.json").exists()

    @classmethod
    def load(cls, directory: Path) -> Carry:
        state = json.loads((directory / f"{NAME}.json").read_text())
        tensors = load_file(str(directory / f"{NAME}.safetensors"))
        ex = Examples(tensors["inputs"].numpy(), tensors["targets"].numpy())
        return cls(ex, list(state["spans"]), [int(n) for n in state["sizes"]])
