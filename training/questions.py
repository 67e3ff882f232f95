"""The gate's recent questions: the newest held-out questions of earlier rounds, kept with each
version, to top up a small round's own questions to ``gate.min_eval_users`` users.

A micro-round of a few hundred events holds out the last events of perhaps eight users, and the
gate needs twenty to tell a regression from noise; without a top-up every round waits for about a
thousand events (ten seconds of a 100 events/s stream) although it trains in two. Borrowing from
earlier rounds is sound because of two rules:

- A held-out event is never a training target, in its round or later, so no version has been
  trained to answer an earlier round's question.
- Only questions of users with no event in this round are borrowed. The candidate differs from
  the champion by exactly this round's events, so on a borrowed question neither has seen
  anything of its user that the other has not: the comparison stays paired and fair.

The champion passed its own gate partly on some of these questions, which if anything favours it
(winner's curse): the top-up can make the gate stricter, never laxer.

Stored like the replay reservoir (safetensors + JSON). A stored question's ``seen`` set is its
history window (``holdout_from_examples``' rule); the round's own questions keep their full one.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from training.data import Holdout

NAME = "recent_questions"


def user_keys(users: list[str]) -> np.ndarray:
    """A stable 64-bit key per user id, the same in every round (a round's own ``Holdout.users``
    are indices into that round's users and mean nothing to the next). [U] int64"""
    digests = [hashlib.blake2b(u.encode(), digest_size=8).digest() for u in users]
    return np.asarray([int.from_bytes(d, "little", signed=True) for d in digests], np.int64)


class RecentQuestions:
    """The newest ``capacity`` held-out questions, oldest first, each with its user's key."""

    def __init__(self, capacity: int, max_len: int) -> None:
        self.capacity = capacity
        self.max_len = max_len
        self.histories = np.zeros((0, max_len), dtype=np.int64)  # [Q, L]
        self.targets = np.zeros(0, dtype=np.int64)  # [Q]
        self.users = np.zeros(0, dtype=np.int64)  # [Q] user keys

    def __len__(self) -> int:
        return len(self.targets)

    def add(self, hold: Holdout) -> None:
        """Keep a round's own questions (``hold.users`` must be user keys), dropping the oldest."""
        assert hold.users is not None, "recent questions need user keys"
        self.histories = _newest(np.concatenate([self.histories, hold.histories]), self.capacity)
        self.targets = _newest(np.concatenate([self.targets, hold.targets]), self.capacity)
        self.users = _newest(np.concatenate([self.users, hold.users]), self.capacity)

    def top_up(self, own: Holdout, min_users: int) -> tuple[Holdout, int]:
        """``own`` (keyed by user) plus the newest stored questions of users absent from it, whole
        users at a time, until the set has ``min_users`` users or nothing is left to borrow.
        Returns the set and how many users were borrowed."""
        assert own.users is not None, "the round's questions need user keys"
        have = set(own.users.tolist())
        need = min_users - len(have)
        if need <= 0 or not len(self):
            return own, 0
        borrowed: list[int] = []
        for key in self.users[::-1].tolist():  # newest first
            if key not in have:
                have.add(key)
                borrowed.append(key)
                if len(borrowed) == need:
                    break
        pick = np.nonzero(np.isin(self.users, borrowed))[0]
        hist = self.histories[pick]
        seen = [{int(v) for v in row if v} for row in hist]
        return (
            Holdout(
                np.concatenate([own.histories, hist]),
                np.concatenate([own.targets, self.targets[pick]]),
                own.seen + seen,
                np.concatenate([own.users, self.users[pick]]),
            ),
            len(borrowed),
        )

    def save(self, directory: Path) -> list[Path]:
        tensors = {
            "histories": torch.from_numpy(np.ascontiguousarray(self.histories)),
            "targets": torch.from_numpy(np.ascontiguousarray(self.targets)),
            "users": torch.from_numpy(np.ascontiguousarray(self.users)),
        }
        save_file(tensors, str(directory / f"{NAME}.safetensors"))
        state = {"capacity": self.capacity, "max_len": self.max_len}
        (directory / f"{NAME}.json").write_text(json.dumps(state))
        return [directory / f"{NAME}.safetensors", directory / f"{NAME}.json"]

    @staticmethod
    def exists(directory: Path | None) -> bool:
        return directory is not None and (directory / f"{NAME}.json").exists()

    @classmethod
    def load(cls, directory: Path, capacity: int) -> RecentQuestions:
        state = json.loads((directory / f"{NAME}.json").read_text())
        rq = cls(capacity, int(state["max_len"]))
        t = load_file(str(directory / f"{NAME}.safetensors"))
        rq.histories = _newest(t["histories"].numpy(), capacity)
        rq.targets = _newest(t["targets"].numpy(), capacity)
        rq.users = _newest(t["users"].numpy(), capacity)
        return rq


def _newest(a: np.ndarray, n: int) -> np.ndarray:
    """The last ``n`` rows of ``a`` (none for n <= 0; ``a[-0:]`` would be all of them)."""
    return a[max(len(a) - n, 0) :] if n > 0 else a[:0]
