"""A bounded reservoir sample over every training example the lineage has seen.

Algorithm R (Vitter; what Avalanche's ReservoirSamplingBuffer does): after n examples each one is
in the reservoir with probability capacity / n, so old history keeps a fair share as the stream
grows. Deterministic: the generator's state is saved with the reservoir, so the same stream with
the same seed always yields the same reservoir. Persisted as safetensors + JSON, no pickle.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from training.data import Examples


class Reservoir:
    def __init__(self, capacity: int, max_len: int, seed: int = 0) -> None:
        self.capacity = capacity
        self.max_len = max_len
        self.seen = 0
        self.rng = np.random.default_rng(seed)
        self.inputs = np.zeros((0, max_len), dtype=np.int64)
        self.targets = np.zeros((0, max_len), dtype=np.int64)

    def __len__(self) -> int:
        return int(self.inputs.shape[0])

    def add(self, ex: Examples) -> None:
        """Offer every example of a round to the reservoir, in order."""
        fill = min(max(self.capacity - len(self), 0), len(ex))
        if fill:
            self.inputs = np.concatenate([self.inputs, ex.inputs[:fill]])
            self.targets = np.concatenate([self.targets, ex.targets[:fill]])
        self.seen += fill
        for i in range(fill, len(ex)):
            self.seen += 1
            j = int(self.rng.integers(0, self.seen))
            if j < self.capacity:
                self.inputs[j] = ex.inputs[i]
                self.targets[j] = ex.targets[i]

    def sample(self, n: int, exclude: np.ndarray | None = None) -> Examples:
        """n examples without replacement (fewer if the reservoir is smaller)."""
        pool = np.arange(len(self))
        if exclude is not None and len(exclude):
            pool = np.setdiff1d(pool, exclude)
        n = min(n, len(pool))
        idx = np.sort(self.rng.choice(pool, size=n, replace=False)) if n else pool[:0]
        return Examples(self.inputs[idx], self.targets[idx])

    def save(self, directory: Path, name: str = "replay") -> list[Path]:
        tensors = {
            "inputs": torch.from_numpy(self.inputs),
            "targets": torch.from_numpy(self.targets),
        }
        save_file(tensors, str(directory / f"{name}.safetensors"))
        state = {
            "capacity": self.capacity,
            "max_len": self.max_len,
            "seen": self.seen,
            "rng": self.rng.bit_generator.state,
        }
        (directory / f"{name}.json").write_text(json.dumps(state))
        return [directory / f"{name}.safetensors", directory / f"{name}.json"]

    @staticmethod
    def exists(directory: Path, name: str = "replay") -> bool:
        return (directory / f"{name}.json").exists()

    @classmethod
    def load(cls, directory: Path, capacity: int | None = None, name: str = "replay") -> Reservoir:
        state = json.loads((directory / f"{name}.json").read_text())
        res = cls(capacity if capacity is not None else state["capacity"], state["max_len"])
        res.seen = state["seen"]
        res.rng.bit_generator.state = state["rng"]
        tensors = load_file(str(directory / f"{name}.safetensors"))
        res.inputs = tensors["inputs"].numpy()[: res.capacity]
        res.targets = tensors["targets"].numpy()[: res.capacity]
        return res
