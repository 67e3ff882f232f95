"""What a replica serves and how a batch of requests is scored.

A loaded version (``Loaded``) and the batch path of ``/recommend`` and ``/score``: the live
histories of the batch's users from one call to the serving context, one model forward over
every request with a usable history (``score_rows``), each request's own error kept apart.
Ranking and the answer stay per request, in ``serving.app``.
"""

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from fastapi import HTTPException

from training.data import left_pad
from training.model import Recommender
from training.registry import Registry
from training.vocab import ItemVocab


@dataclass(frozen=True)
class Loaded:
    version: int
    model: Recommender
    vocab: ItemVocab
    unit_emb: torch.Tensor  # [V, D] unit-norm rows, for MMR
    popularity: torch.Tensor  # [V] log-count prior, for users with no usable history


def load_version(registry: Registry, version: int) -> Loaded:
    lv = registry.load(version)  # verifies hashes; raises on a bad version
    pop_file = lv.path / "popularity.json"
    counts = torch.zeros(len(lv.vocab))
    if pop_file.exists():
        import json

        raw = torch.tensor(json.loads(pop_file.read_text()), dtype=torch.float32)
        counts[: len(raw)] = raw[: len(counts)]
    return as_loaded(version, lv.model, lv.vocab, counts)


def as_loaded(version: int, model: Recommender, vocab: ItemVocab, counts: torch.Tensor) -> Loaded:
    """A version ready to serve: ``model`` in eval mode, ``counts`` [V] its items' event counts."""
    emb = model.item_embeddings().detach()
    unit = emb / emb.norm(dim=1, keepdim=True).clamp(min=1e-9)
    pop = torch.log1p(counts)
    pop[0] = float("-inf")
    return Loaded(version, model, vocab, unit, pop)


@dataclass(frozen=True)
class Ask:
    """One request's share of a batch: the history it sent (already checked against the limits),
    else the user whose live history the batch looks up; neither: popularity."""

    history: list[str] | None
    user_id: str | None


@dataclass(frozen=True)
class Scored:
    """What one request gets back from its batch."""

    m: Loaded  # the batch's one snapshot: the version that scored, so the one the answer names
    history: list[str]
    rows: list[int]  # the history's known items
    result: torch.Tensor | HTTPException  # [V] scores, or this request's error
    source: str  # "history" or "popularity"

    def scores(self) -> torch.Tensor:
        if isinstance(self.result, HTTPException):
            raise self.result
        return self.result


def score_rows(m: Loaded, rows: list[list[int]]) -> list[torch.Tensor | HTTPException]:
    """Each request's [V] scores from one forward over every request with a usable history
    (each left-padded to max_len, stacked into one [B, L] tensor); popularity for the others.

    A request whose scores are not finite gets its own 500 (a broken version: an error the
    rollout sees); the other requests of the batch are answered.
    """
    out: list[torch.Tensor | HTTPException] = [m.popularity.clone() for _ in rows]
    use = [i for i, r in enumerate(rows) if r]
    if not use:
        return out
    x = torch.from_numpy(np.stack([left_pad(rows[i], m.model.cfg.max_len) for i in use]))
    with torch.no_grad():
        s = m.model.score(x)  # [B, V]
    finite = torch.isfinite(s[:, 1:]).all(dim=1).tolist()
    for j, i in enumerate(use):
        out[i] = (
            s[j]
            if finite[j]
            else HTTPException(500, f"model version {m.version} produced non-finite scores")
        )
    return out


async def score_asks(
    m: Loaded, asks: list[Ask], histories: Callable[[list[str]], Awaitable[list[list[str]]]]
) -> list[Scored]:
    """A batch of requests scored by ``m``: the live histories of those that sent none, from one
    ``histories(users)`` call, then one forward (``score_rows``); in the order of ``asks``."""
    fetched = iter(
        await histories([a.user_id for a in asks if a.history is None and a.user_id is not None])
    )
    chosen = [
        a.history if a.history is not None else next(fetched) if a.user_id is not None else []
        for a in asks
    ]
    rows = [m.vocab.encode(h) for h in chosen]
    return [
        Scored(m, h, r, s, "history" if r else "popularity")
        for h, r, s in zip(chosen, rows, score_rows(m, rows), strict=True)
    ]


async def fetch_histories(ctx: Any, users: list[str]) -> list[list[str]]:
    """Every user's live history in one call to the context actor. One started by an older
    release (detached, it can outlive an upgrade) lacks the batch method: one call per user."""
    try:
        method = ctx.get_histories
    except AttributeError:
        return list(await asyncio.gather(*(ctx.get_history.remote(u) for u in users)))
    out: list[list[str]] = await method.remote(users)
    return out
