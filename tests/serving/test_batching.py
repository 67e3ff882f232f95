"""Batched scoring without a cluster: the functions a replica's batch runs, on a small model.

A batch must answer each request exactly as if it had been scored alone (one forward for all
of them), keep the requests' order, use one version snapshot, and fail only the request whose
scores are broken.
"""

from __future__ import annotations

import asyncio
import threading
from dataclasses import replace

import pytest
import torch
from fastapi import HTTPException

from serving.clicks import ClickBook
from serving.history_feed import ChangeLog
from serving.history_shard import HistoryShard
from serving.history_store import HistoryStore
from serving.scoring import Ask, Loaded, as_loaded, score_asks, score_rows
from training.config import ModelConfig
from training.model import Recommender
from training.ranking import top_k
from training.vocab import ItemVocab

ITEMS = [f"i{n}" for n in range(1, 40)]


@pytest.fixture
def version() -> Loaded:
    torch.manual_seed(0)
    cfg = ModelConfig(max_len=8, d_model=16, n_layers=2, n_heads=2, text_init=False)
    vocab = ItemVocab(ITEMS)
    model = Recommender(cfg, len(vocab))
    model.eval()
    return as_loaded(7, model, vocab, torch.arange(len(vocab), dtype=torch.float32))


ROWS = [[1, 2, 3], [], [5], list(range(1, 20)), [9, 9, 4, 30], []]  # one longer than max_len


def test_batched_scores_equal_one_by_one(version: Loaded) -> None:
    batched = score_rows(version, ROWS)
    assert len(batched) == len(ROWS)
    for rows, got in zip(ROWS, batched, strict=True):
        alone = score_rows(version, [rows])[0]
        assert isinstance(got, torch.Tensor) and isinstance(alone, torch.Tensor)
        assert got.shape == (len(ITEMS) + 1,)
        if not rows:  # no usable history: the popularity prior, untouched by the model
            assert torch.equal(got, version.popularity)
        else:
            assert torch.allclose(got[1:], alone[1:], rtol=1e-5, atol=1e-5)
            assert got[0] == float("-inf")
            assert top_k(got, 10).tolist() == top_k(alone, 10).tolist()
    # distinct histories really get distinct scores (the batch did not repeat one row)
    first, second = batched[0], batched[2]
    assert isinstance(first, torch.Tensor) and isinstance(second, torch.Tensor)
    assert not torch.allclose(first[1:], second[1:])


def test_one_forward_per_batch(version: Loaded) -> None:
    shapes: list[tuple[int, ...]] = []
    real = version.score

    def counting(x: torch.Tensor) -> torch.Tensor:
        shapes.append(tuple(x.shape))
        return real(x)

    version = replace(version, score=counting)
    score_rows(version, ROWS)
    assert shapes == [(4, 8)]  # the four requests with a history, left-padded to max_len
    shapes.clear()
    score_rows(version, [[], []])
    assert shapes == []  # popularity only: no forward at all


def test_non_finite_row_fails_only_its_own_request(
    version: Loaded,
) -> None:
    clean = score_rows(version, ROWS)
    real = version.score
    poisoned_item = 30  # only ROWS[4] holds it

    def poisoning(x: torch.Tensor) -> torch.Tensor:
        s = real(x)
        s[(x == poisoned_item).any(dim=1), 5] = float("nan")
        return s

    version = replace(version, score=poisoning)
    out = score_rows(version, ROWS)
    bad = out[4]
    assert isinstance(bad, HTTPException) and bad.status_code == 500
    assert "version 7" in str(bad.detail) and "non-finite" in str(bad.detail)
    for i, (got, want) in enumerate(zip(out, clean, strict=True)):
        if i == 4:
            continue
        assert isinstance(got, torch.Tensor) and isinstance(want, torch.Tensor)
        assert torch.allclose(got[1:], want[1:], rtol=1e-5, atol=1e-5)


def test_score_asks_one_lookup_in_request_order(version: Loaded) -> None:
    live = {"u1": ["i3", "i4"], "u2": [], "u3": ["i9", "nope"]}
    calls: list[list[str]] = []

    async def histories(users: list[str]) -> list[list[str]]:
        calls.append(users)
        return [live[u] for u in users]

    asks = [
        Ask(None, "u1"),
        Ask(["i1", "unknown", "i2"], "u2"),  # a sent history wins over the live one
        Ask(None, "u2"),  # no live history: popularity
        Ask(["i5"], None),
        Ask(None, "u3"),
    ]
    out = asyncio.run(score_asks(version, asks, histories))
    assert calls == [["u1", "u2", "u3"]]  # one look-up, only for those who sent no history
    assert [s.history for s in out] == [
        ["i3", "i4"], ["i1", "unknown", "i2"], [], ["i5"], ["i9", "nope"],
    ]  # fmt: skip
    assert [s.rows for s in out] == [[3, 4], [1, 2], [], [5], [9]]
    assert [s.source for s in out] == ["history", "history", "popularity", "history", "history"]
    assert all(s.m is version for s in out)  # one snapshot for the whole batch
    for s in out:
        alone = score_rows(version, [s.rows])[0]
        assert isinstance(alone, torch.Tensor)
        assert torch.allclose(s.scores()[1:], alone[1:], rtol=1e-5, atol=1e-5)


def test_score_asks_raises_only_for_the_broken_request(
    version: Loaded,
) -> None:
    real = version.score

    def poisoning(x: torch.Tensor) -> torch.Tensor:
        s = real(x)
        s[(x == 30).any(dim=1)] = float("inf")
        return s

    async def no_lookup(users: list[str]) -> list[list[str]]:
        assert not users
        return []

    version = replace(version, score=poisoning)
    out = asyncio.run(score_asks(version, [Ask(["i30"], None), Ask(["i1"], None)], no_lookup))
    with pytest.raises(HTTPException) as err:
        out[0].scores()
    assert err.value.status_code == 500
    assert torch.isfinite(out[1].scores()[1:]).all()


def test_shard_get_histories_matches_get_history() -> None:
    # The actor's state only (its constructor starts a Kafka consumer): the lookup is pure.
    shard = HistoryShard.__new__(HistoryShard)
    shard.lock = threading.Lock()
    shard._changed = threading.Condition(shard.lock)
    shard.history = HistoryStore(3)
    shard.feed = ChangeLog(1000)
    shard.clicks = ClickBook()
    shard.events_seen = 0
    for user, item in [("a", "1"), ("b", "2"), ("a", "3"), ("a", "4"), ("a", "5")]:
        shard._on_event(user, item, "view")
    users = ["a", "missing", "b", "a"]
    assert shard.get_histories(users) == [shard.get_history(u) for u in users]
    assert shard.get_histories(users) == [["3", "4", "5"], [], ["2"], ["3", "4", "5"]]
    assert shard.get_histories([]) == []
    assert shard.feed.seq == 5 and shard.events_seen == 5
