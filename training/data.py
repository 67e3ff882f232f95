"""From buffer rows to training examples: per-user, time-ordered item-row sequences.

An example is a left-padded window of ``max_len + 1`` consecutive items of one user: inputs are
the first ``max_len``, targets the next item at every position (0 = no loss there). A round's
examples predict only the round's new events; the user's earlier events are context.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from training.vocab import ItemVocab


@dataclass
class Examples:
    inputs: np.ndarray  # [N, L] int64 item rows, left-padded
    targets: np.ndarray  # [N, L] int64 next-item rows, 0 = ignore

    def __len__(self) -> int:
        return int(self.inputs.shape[0])

    @classmethod
    def empty(cls, max_len: int) -> Examples:
        z = np.zeros((0, max_len), dtype=np.int64)
        return cls(z, z.copy())

    def concat(self, other: Examples) -> Examples:
        return Examples(
            np.concatenate([self.inputs, other.inputs]),
            np.concatenate([self.targets, other.targets]),
        )

    def take(self, idx: np.ndarray) -> Examples:
        return Examples(self.inputs[idx], self.targets[idx])

    def shard(self, rank: int, world: int) -> Examples:
        """Rank ``rank``'s share of ``world`` equal shards (strided, wrapped around to pad).

        Every rank must take the same number of optimizer steps: each step all-reduces gradients,
        so one extra batch on one rank leaves the others waiting forever at the epoch's end
        (``np.arange(rank, n, world)`` alone gives rank 0 one more example when n is odd).
        Padding repeats at most ``world - 1`` examples, as torch's DistributedSampler does.
        """
        n = len(self)
        if n == 0:
            return self
        per_rank = -(-n // world)  # ceil
        idx = np.arange(rank, per_rank * world, world) % n
        return self.take(idx)


@dataclass
class Holdout:
    """Next-item questions: history rows -> target row.

    ``users`` groups the questions by who asked them (a round may hold out several of a user's
    events, and those answers are not independent); None: every question its own user.
    """

    histories: np.ndarray  # [Q, L]
    targets: np.ndarray  # [Q]
    seen: list[set[int]]  # rows each user already interacted with (excluded from ranking)
    users: np.ndarray | None = None  # [Q] int: which user asked each question
    # [Q] int: which event of its source each question asks about, so two models' questions on
    # the same events can be paired (``metrics.paired_gap``); None where nothing pairs them.
    asked: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.targets)

    @property
    def n_users(self) -> int:
        """How many users asked the questions."""
        return len(np.unique(self.users)) if self.users is not None else len(self)


def user_sequences(table: pa.Table, vocab: ItemVocab) -> dict[str, list[int]]:
    """user_id -> item rows in time order (the buffer returns rows sorted by ts)."""
    seqs: dict[str, list[int]] = defaultdict(list)
    users = table.column("user_id").to_pylist()
    items = table.column("item_id").to_pylist()
    for u, i in zip(users, items, strict=True):
        row = vocab.index(i)
        if row is not None:
            seqs[u].append(row)
    return dict(seqs)


def left_pad(seq: list[int], length: int) -> np.ndarray:
    out = np.zeros(length, dtype=np.int64)
    tail = seq[-length:]
    if tail:
        out[length - len(tail) :] = tail
    return out


def windows(full: list[int], first_target: int, max_len: int) -> Examples:
    """Examples whose targets are full[first_target:], each window max_len items of context."""
    ins, tgs = [], []
    end = len(full)
    while end - 1 >= max(first_target, 1):
        start = max(0, end - 1 - max_len)
        x = full[start : end - 1]
        y = full[start + 1 : end]
        # Only positions predicting an item at index >= first_target carry loss.
        y = [t if start + 1 + j >= first_target else 0 for j, t in enumerate(y)]
        ins.append(left_pad(x, max_len))
        tgs.append(left_pad(y, max_len))
        end = start + 1
    if not ins:
        return Examples.empty(max_len)
    return Examples(np.stack(ins), np.stack(tgs))


def round_examples(
    context: dict[str, list[int]],
    new: dict[str, list[int]],
    max_len: int,
    holdout: int,
    seen: dict[str, set[int]] | None = None,
) -> tuple[Examples, Holdout]:
    """Training examples over the new events (context = earlier events), and each user's last
    ``holdout`` new events held out as evaluation questions (not trained on); never more than
    half of a user's new events, but always the last one, and only events with a history.

    ``context`` needs only each user's last ``max_len`` rows; ``seen`` adds the rows of older
    history to what evaluation excludes from ranking (the context's rows always count).
    """
    parts: list[Examples] = []
    h_hist, h_tgt, h_seen, h_user = [], [], [], []
    for u, (user, rows) in enumerate(new.items()):
        ctx = context.get(user, [])
        full = ctx + rows
        older = (seen or {}).get(user, set())
        n_hold = min(int(holdout), max(1, len(rows) // 2), len(full) - 1) if holdout else 0
        for pos in range(len(full) - n_hold, len(full)):
            h_hist.append(left_pad(full[:pos], max_len))
            h_tgt.append(full[pos])
            h_seen.append(set(full[:pos]) | older)
            h_user.append(u)
        full = full[: len(full) - n_hold]
        first = len(ctx)
        if len(full) > max(first, 1):
            parts.append(windows(full, first, max_len))
    ex = Examples.empty(max_len)
    for p in parts:
        ex = ex.concat(p)
    hold = Holdout(
        np.stack(h_hist) if h_hist else np.zeros((0, max_len), dtype=np.int64),
        np.asarray(h_tgt, dtype=np.int64),
        h_seen,
        np.asarray(h_user, dtype=np.int64),
    )
    return ex, hold


def holdout_as_examples(hold: Holdout) -> Examples:
    """The inverse of ``holdout_from_examples``: each question as one window whose only target
    is the last position, so held-out questions can live in a ``Reservoir``."""
    targets = np.zeros_like(hold.histories)
    if len(hold):
        targets[:, -1] = hold.targets
    return Examples(hold.histories.copy(), targets)


def holdout_from_examples(ex: Examples) -> Holdout:
    """A replay example as an evaluation question: its last target given everything before."""
    x, y = ex.inputs, ex.targets
    L = x.shape[1]
    has = (y != 0).any(axis=1)
    x, y = x[has], y[has]
    last = L - 1 - np.argmax(y[:, ::-1] != 0, axis=1)  # each row's last target position
    tgt = y[np.arange(len(y)), last]
    # The items up to that position, zeros dropped, left-padded: a stable sort moves the kept
    # items to the right end in their order (done per row in Python, this was ~25 ms a round
    # over the gate's 500 replay probes).
    keep = (np.arange(L)[None, :] <= last[:, None]) & (x != 0)
    order = np.argsort(keep, axis=1, kind="stable")
    hist = np.where(
        np.take_along_axis(keep, order, axis=1), np.take_along_axis(x, order, axis=1), 0
    )
    seen = [set(row[row != 0].tolist()) for row in hist]
    return Holdout(hist.astype(np.int64), tgt.astype(np.int64), seen)


def next_slice_holdout(
    before: pa.Table, slice_: pa.Table, vocab: ItemVocab, max_len: int, max_cases: int, seed: int
) -> Holdout:
    """Test-then-train questions: each event of ``slice_`` given the user's every earlier event.

    ``before`` holds the users' events before the slice (time order, like the slice). A seeded
    subsample of at most ``max_cases`` events bounds the cost. A target the model's ``vocab`` does
    not know gets row ``len(vocab)`` (past its table), which ``evaluate`` counts as a miss: a
    model cannot recommend an item it has never seen, and that is part of what staleness costs.
    The subsample, ``users`` (numbered by first appearance in the slice) and ``asked`` (the
    event's position in the slice) depend on the slice and the seed alone, not on ``vocab``, so
    two models' holdouts of the same slice pair up question by question.
    """
    seqs = user_sequences(before, vocab)
    users = slice_.column("user_id").to_pylist()
    items = slice_.column("item_id").to_pylist()
    rng = np.random.default_rng(seed)
    keep = np.zeros(len(users), dtype=bool)
    keep[rng.choice(len(users), min(max_cases, len(users)), replace=False)] = True
    code: dict[str, int] = {}
    hist, tgt, seen, who, asked = [], [], [], [], []
    for j, (u, i) in enumerate(zip(users, items, strict=True)):
        row = vocab.index(i)
        prior = seqs.setdefault(u, [])
        user = code.setdefault(u, len(code))
        if keep[j] and prior:
            hist.append(left_pad(prior, max_len))
            tgt.append(len(vocab) if row is None else row)
            seen.append(set(prior))
            who.append(user)
            asked.append(j)
        if row is not None:
            prior.append(row)
    return Holdout(
        np.stack(hist) if hist else np.zeros((0, max_len), dtype=np.int64),
        np.asarray(tgt, dtype=np.int64),
        seen,
        users=np.asarray(who, dtype=np.int64),
        asked=np.asarray(asked, dtype=np.int64),
    )
