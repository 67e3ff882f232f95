"""The history index through the registry: versions share its parts without depending on each
other's directories, so pruning any version leaves every other one whole."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors.numpy import save_file

from training.histories import UserHistories
from training.registry import Registry
from training.vocab import ItemVocab

ITEMS = [f"i{k}" for k in range(50)]


def history_writer(reg: Registry, base: int | None, new: dict[str, list[int]]) -> Any:
    """A round's files: weights, the item map and its users' history entries after ``base``'s."""
    base_dir = reg.path(base) if base is not None else None
    have = UserHistories.load(base_dir, new, 4) if UserHistories.exists(base_dir) else None

    def write(d: Path) -> None:
        save_file({"w": np.ones((4, 3), np.float32)}, str(d / "model.safetensors"))
        ItemVocab(ITEMS).save(d / "vocab.json")
        (have or UserHistories(4)).extended(new).save(d, base_dir)

    return write


def run_rounds(reg: Registry, rounds: list[dict[str, list[int]]]) -> list[int]:
    versions: list[int] = []
    for new in rounds:
        base = reg.latest()
        versions.append(reg.register(history_writer(reg, base, new), {"watermark": {"t:0": 1}},
                                     promote=True, reason="r", expect_latest=base))  # fmt: skip
    return versions


def expected(rounds: list[dict[str, list[int]]]) -> dict[str, list[str]]:
    out: dict[str, list[int]] = {}
    for new in rounds:
        for u, rows in new.items():
            out[u] = (out.get(u, []) + rows)[-4:]
    return {u: [ITEMS[r - 1] for r in rows] for u, rows in out.items()}


def as_dict(table: Any) -> dict[str, list[str]]:
    return dict(zip(table["user_id"].to_pylist(), table["recent"].to_pylist(), strict=True))


def sample_rounds(n: int, users: int, per_round: int, seed: int = 0) -> list[dict[str, list[int]]]:
    rng = random.Random(seed)
    return [
        {f"u{rng.randrange(users)}": [rng.randrange(1, 51)] for _ in range(per_round)}
        for _ in range(n)
    ]


def test_pruning_a_middle_version_keeps_later_ones_readable(tmp_path: Path) -> None:
    reg = Registry(tmp_path / "reg", keep=10)
    rounds = [{f"u{i}": [1 + i % 50] for i in range(300)}, *sample_rounds(5, 400, 8)]
    versions = run_rounds(reg, rounds)
    # The later versions carry parts the middle ones wrote; drop every one but the newest.
    reg.keep = 1
    dirs = [reg.path(v) for v in versions]
    assert reg.prune() == versions[:-1]
    assert not any(d.exists() for d in dirs[:-1])
    assert reg.verify(versions[-1])["version"] == versions[-1]
    assert as_dict(reg.read_histories(versions[-1])) == expected(rounds)
    # And the chain goes on from there.
    more = sample_rounds(2, 400, 8, seed=1)
    last = run_rounds(reg, more)[-1]
    assert as_dict(reg.read_histories(last)) == expected(rounds + more)


def test_a_version_carries_the_parts_it_reads_as_links(tmp_path: Path) -> None:
    """Bytes a version adds to the registry scale with its round's users, not with all users."""
    reg = Registry(tmp_path / "reg")
    first = run_rounds(reg, [{f"u{i}": [1 + i % 50, 2] for i in range(20_000)}])[0]
    seen = {p.stat().st_ino for p in reg.path(first).rglob("*") if p.is_file()}
    snapshot = sum(p.stat().st_size for p in reg.path(first).glob("shared/*"))
    written = []
    for v in run_rounds(reg, sample_rounds(4, 20_000, 40)):
        files = [p for p in reg.path(v).glob("shared/*")]
        written.append(sum(p.stat().st_size for p in files if p.stat().st_ino not in seen))
        seen |= {p.stat().st_ino for p in files}
    assert snapshot > 100_000 and max(written) < snapshot / 20, (snapshot, written)


def test_a_version_without_an_index_says_so(tmp_path: Path) -> None:
    from training.errors import HistoriesError

    reg = Registry(tmp_path / "reg")

    def write(d: Path) -> None:
        save_file({"w": np.ones((4, 3), np.float32)}, str(d / "model.safetensors"))
        ItemVocab(ITEMS).save(d / "vocab.json")

    v = reg.register(write, {}, promote=True, reason="r", expect_latest=None)
    with pytest.raises(HistoriesError):
        reg.read_histories(v)
