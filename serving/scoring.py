"""What a replica serves and how a batch of requests is scored.

A loaded version (``Loaded``) and the batch path of ``/recommend`` and ``/score``: the live
histories of the batch's users from one call to the serving context, one model forward over
every request with a usable history (``score_rows``), each request's own error kept apart.
While a live trial runs, the requests drawn for an interleaved answer are scored by the trial's
other version too, in the same batch: the same histories, one more forward over just those
requests. Ranking and the answer stay per request, in ``serving.app`` and ``serving.live_answer``.
"""

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from fastapi import HTTPException

from serving.api import RecommendRequest, ScoreRequest
from serving.config import ServingConfig
from serving.http_errors import limit_error
from training.data import left_pad
from training.model import Recommender
from training.ranking import top_k_rows
from training.registry import Registry
from training.vocab import ItemVocab


@dataclass(frozen=True)
class Loaded:
    version: int
    model: Recommender
    vocab: ItemVocab
    unit_emb: torch.Tensor  # [V, D] unit-norm rows, for MMR
    popularity: torch.Tensor  # [V] log-count prior, for users with no usable history
    # [B, max_len] -> [B, V]: ``model.score`` run by the graph traced once per model shape
    score: Callable[[torch.Tensor], torch.Tensor] = field(repr=False)


def load_version(registry: Registry, version: int) -> Loaded:
    lv = registry.load(version)  # verifies hashes; raises on a bad version
    counts = torch.tensor(lv.popularity, dtype=torch.float32)
    return as_loaded(version, lv.model, lv.vocab, counts)


def as_loaded(version: int, model: Recommender, vocab: ItemVocab, counts: torch.Tensor) -> Loaded:
    """A version ready to serve: ``model`` in eval mode and traced, ``counts`` [V] its items'
    event counts."""
    emb = model.item_embeddings().detach()
    unit = emb / emb.norm(dim=1, keepdim=True).clamp(min=1e-9)
    pop = torch.log1p(counts)
    pop[0] = float("-inf")
    return Loaded(version, model, vocab, unit, pop, model.serving_scorer())


@dataclass(frozen=True)
class Ask:
    """One request's share of a batch: the history it sent (already checked against the limits),
    else the user whose live history the batch looks up; neither: popularity."""

    history: list[str] | None
    user_id: str | None
    want: int = 0  # candidates to rank for it (a /recommend), 0: scores only (a /score)
    exclude_seen: bool = True  # its history's items are never candidates
    # drawn for an interleaved answer: the live trial's other version ranks it too
    both: bool = False


def ask_of(req: RecommendRequest | ScoreRequest, cfg: ServingConfig, both: bool = False) -> Ask:
    """A request's share of a batch, its sent history checked against the limit first;
    ``both``: a /recommend drawn for an interleaved answer (the coin is the caller's)."""
    if req.history is not None and len(req.history) > cfg.max_history:
        raise limit_error(
            ["body", "history"],
            f"history has {len(req.history)} items; at most {cfg.max_history}",
            "too_long",
        )
    if isinstance(req, RecommendRequest):
        return Ask(req.history, req.user_id, max(req.k * 5, 50), req.exclude_seen, both)
    return Ask(req.history, req.user_id)


@dataclass(frozen=True)
class Scored:
    """What one request gets back from its batch."""

    m: Loaded  # the batch's one snapshot: the version that scored, so the one the answer names
    history: list[str]
    rows: list[int]  # the history's known items
    result: torch.Tensor | HTTPException  # [V] scores, or this request's error
    source: str  # "history" or "popularity"
    candidates: torch.Tensor | None = None  # the ``want`` best rows, best first (``top_k``)
    # The live trial's other version's own Scored of the same history (its vocab, its forward),
    # for an ask that wants both and a batch that had the other version; else None.
    theirs: "Scored | None" = None

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
    use = [i for i, r in enumerate(rows) if r]
    # Popularity for those with no usable history (a copy each: callers may write into it).
    out: list[torch.Tensor | HTTPException] = [
        m.popularity if r else m.popularity.clone() for r in rows
    ]
    if not use:
        return out
    x = torch.from_numpy(np.stack([left_pad(rows[i], m.model.cfg.max_len) for i in use]))
    with torch.inference_mode():
        s = m.score(x)  # [B, V]
    finite = torch.isfinite(s[:, 1:]).all(dim=1).tolist()
    for j, i in enumerate(use):
        out[i] = (
            s[j]
            if finite[j]
            else HTTPException(500, f"model version {m.version} produced non-finite scores")
        )
    return out


async def score_asks(
    m: Loaded,
    asks: list[Ask],
    histories: Callable[[list[str]], Awaitable[list[list[str]]]],
    other: Loaded | None = None,
) -> list[Scored]:
    """A batch of requests scored by ``m``: the live histories of those that sent none, from one
    ``histories(users)`` call, then one forward (``score_rows``); in the order of ``asks``.

    ``other``: the live trial's other version. The asks that want both are scored by it too, in
    one more forward over just them; each gets it as ``theirs``. The same histories, encoded by
    ``other``'s vocab (the two catalogs may differ), so both versions rank the same request.
    """
    fetched = iter(
        await histories([a.user_id for a in asks if a.history is None and a.user_id is not None])
    )
    chosen = [
        a.history if a.history is not None else next(fetched) if a.user_id is not None else []
        for a in asks
    ]
    out = _scored(m, asks, chosen)
    theirs = _score_theirs(other, asks, chosen) if other is not None else {}
    return [replace(s, theirs=theirs[i]) if i in theirs else s for i, s in enumerate(out)]


def _scored(m: Loaded, asks: list[Ask], chosen: list[list[str]]) -> list[Scored]:
    """``asks`` scored and ranked by ``m`` in one forward, ``chosen`` their histories."""
    rows = [m.vocab.encode(h) for h in chosen]
    scored = score_rows(m, rows)
    cands = rank_candidates(asks, rows, scored)
    return [
        Scored(m, h, r, s, "history" if r else "popularity", c)
        for h, r, s, c in zip(chosen, rows, scored, cands, strict=True)
    ]


def _score_theirs(other: Loaded, asks: list[Ask], chosen: list[list[str]]) -> dict[int, Scored]:
    """The asks that want both, by their place in the batch, scored by ``other``."""
    both = [i for i, a in enumerate(asks) if a.both]
    if not both:
        return {}
    got = _scored(other, [asks[i] for i in both], [chosen[i] for i in both])
    return dict(zip(both, got, strict=True))


def rank_candidates(
    asks: list[Ask], rows: list[list[int]], scored: list[torch.Tensor | HTTPException]
) -> list[torch.Tensor | None]:
    """Each ranking request's best ``want`` rows (the shared rule, ``top_k_rows``), for the
    whole batch in one pass; None for a /score or a request that failed."""
    rank = [i for i, a in enumerate(asks) if a.want > 0 and isinstance(scored[i], torch.Tensor)]
    out: list[torch.Tensor | None] = [None] * len(asks)
    if not rank:
        return out
    got = top_k_rows(
        torch.stack([scored[i] for i in rank]),  # type: ignore[misc]
        max(asks[i].want for i in rank),
        [rows[i] if asks[i].exclude_seen else None for i in rank],
    )
    for i, c in zip(rank, got, strict=True):
        out[i] = c[: asks[i].want]
    return out
