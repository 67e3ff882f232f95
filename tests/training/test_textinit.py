"""Cold-start rows from titles: each title is embedded once per process, the fit is bounded."""

from __future__ import annotations

import uuid
from typing import Any

import numpy as np
import pytest
import torch

from training import textinit


class Counting:
    """The real encoder, recording what it was asked to embed."""

    def __init__(self) -> None:
        self.real = textinit._encoder()
        self.calls: list[list[str]] = []

    def encode(self, texts: list[str], **kw: Any) -> Any:
        self.calls.append(list(texts))
        return self.real.encode(texts, **kw)


@pytest.fixture
def counting(monkeypatch: pytest.MonkeyPatch) -> Counting:
    enc = Counting()
    monkeypatch.setattr(textinit, "_encoder", lambda: enc)
    return enc


def titles(n: int) -> list[str]:
    tag = uuid.uuid4().hex[:6]  # not embedded by an earlier test of this process
    return [f"Movie {i} {tag} ({1950 + i % 50})" for i in range(n)]


def test_a_title_is_embedded_once(counting: Counting) -> None:
    a, b, c = titles(3)
    first = textinit.embed([a, b])
    second = textinit.embed([b, c, b])
    assert counting.calls == [[a, b], [c]]
    assert second.shape == (3, 384)
    np.testing.assert_array_equal(first[1], second[0])
    np.testing.assert_array_equal(second[0], second[2])


def test_the_fit_embeds_at_most_max_fit_known_titles(
    counting: Counting, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(textinit, "MAX_FIT", 40)
    known, new = titles(300), titles(5)
    rows = torch.randn(300, 16)
    init = textinit.init_rows(rows, known, new)
    assert init is not None and init.shape == (5, 16) and torch.isfinite(init).all()
    embedded = [t for call in counting.calls for t in call]
    assert len([t for t in embedded if t in set(known)]) == 40
    assert set(new) <= set(embedded)


def test_the_fit_sample_barely_moves_as_the_catalog_grows(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(textinit, "MAX_FIT", 100)
    known = titles(1000)
    before = {known[i] for i in textinit.fit_sample(known)}
    grown = known + titles(20)  # a round's new items join the catalog
    after = {grown[i] for i in textinit.fit_sample(grown)}
    assert len(before) == len(after) == 100
    # Each new item displaces a sampled one only when its hash is smaller: ~2 of 100 expected
    # (an evenly spaced pick would have shifted nearly every index).
    assert len(after - before) <= 10
    # Spread over the catalog's age, not its oldest items.
    picked = textinit.fit_sample(known)
    assert picked.min() < 100 and picked.max() > 900


def test_warm_embeds_what_the_next_fit_needs(
    counting: Counting, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(textinit, "MAX_FIT", 30)
    known, new = titles(200), titles(3)
    textinit.warm(known).join(timeout=60)
    warmed = [t for call in counting.calls for t in call]
    assert len(warmed) == 30
    counting.calls.clear()
    textinit.init_rows(torch.randn(200, 8), known, new)
    # The round embeds only its new titles: the fit's were ready.
    assert [t for call in counting.calls for t in call] == new
