"""Text-aware item rows (``ModelConfig.item_repr``): title features kept with the version.

In the text modes every row has a MiniLM title feature (``training.textinit.text_rows``; zeros for
an item without a title, and for padding), stored as a persistent buffer, so the version's
safetensors carry the features it was trained with (computed once per item, when the item joins
the catalog) and strict loading checks them. A learned ``Linear(384 -> d_model)`` maps them into
the model's space; ``Recommender.item_embeddings`` uses that projection alone (``text``) or adds it
to the ID row (``id+text``), for the input embeddings and the tied output scores alike.

The features are standardised before the projection, per dimension, with the mean and spread of
the first model's titled rows (buffers too, fixed for the lineage so a growing catalog never moves
known items), and the projection's output is scaled by ``TEXT_GAIN``. Raw MiniLM vectors share
one large common direction, and AdamW's step does not shrink with the gradient, so every step of
the shared projection moved all items' rows together; the gain slows the projection (its weights
and bias alike) against the per-item ID rows. Measured on MovieLens-100K titles (streaming replay,
4 chunks; NDCG@10 of each round's held-out events, all / cold items), exploration runs, seeds 0-2:
``id`` 0.0635 / 0.050; ``id+text`` with raw features 0.063 / 0.043 (seed 0 only), standardised
0.0712 / 0.046, standardised with gain 0.3 0.0711 / 0.065; gain on the input only (bias unscaled)
0.0635 / 0.023 (seed 0). As shipped (``bench.quality --quick``'s cold-item runs, seeds 0-2):
``id`` 0.0669 ± 0.0042 / 0.045 ± 0.022, ``id+text`` 0.0713 ± 0.0040 / 0.053 ± 0.004 (80 cold
targets: noisy).
"""

from __future__ import annotations

import torch
from torch import nn

TEXT_DIM = 384  # all-MiniLM-L6-v2's sentence embedding size
TEXT_GAIN = 0.3  # the projection's output scale (see the module docstring)


def text_for(
    item_repr: str, text: torch.Tensor | None, n_rows: int, what: str
) -> torch.Tensor | None:
    """The title features a model of ``item_repr`` keeps for ``n_rows`` rows: checked ones in the
    text modes, None in 'id' (which would silently ignore any given: that is refused)."""
    if item_repr == "id":
        if text is not None:
            raise ValueError(f"{what}: text features given, but item_repr='id' would ignore them")
        return None
    return check_text(text, n_rows, what)


def check_text(text: torch.Tensor | None, n_rows: int, what: str) -> torch.Tensor:
    """``text`` as a float32 [n_rows, TEXT_DIM] tensor; a clear ValueError when it is not one."""
    if text is None:
        raise ValueError(
            f"{what}: a text item_repr needs the rows' title features, a [{n_rows}, {TEXT_DIM}] "
            "tensor (training.textinit.text_rows; zeros for items without a title)"
        )
    if tuple(text.shape) != (n_rows, TEXT_DIM):
        raise ValueError(
            f"{what}: text features have shape {tuple(text.shape)}, expected [{n_rows}, {TEXT_DIM}]"
        )
    if not bool(torch.isfinite(text).all()):
        raise ValueError(f"{what}: text features hold non-finite values")
    return text.detach().to(torch.float32).clone()


def _titled(text: torch.Tensor) -> torch.Tensor:
    return (text != 0).any(1)  # [V] rows that have a title (the others are all zeros)


def standardiser(text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-dimension mean and scale mapping titled rows to mean 0 and unit expected norm.

    With fewer than 2 titled rows there is no spread to measure: identity (MiniLM vectors are
    unit-norm already).
    """
    rows = text[_titled(text)]
    if len(rows) < 2:
        return torch.zeros(TEXT_DIM), torch.ones(TEXT_DIM)
    sd = rows.std(0).clamp_min(1e-4)
    return rows.mean(0), 1.0 / (sd * TEXT_DIM**0.5)


class TextItems(nn.Module):
    """The rows' title features (buffer ``text`` [V, 384]) and their projection to [V, D]."""

    text: torch.Tensor
    text_mean: torch.Tensor
    text_scale: torch.Tensor

    def __init__(self, text: torch.Tensor, d_model: int) -> None:
        super().__init__()
        self.register_buffer("text", text, persistent=True)
        mean, scale = standardiser(text)
        self.register_buffer("text_mean", mean, persistent=True)
        self.register_buffer("text_scale", scale, persistent=True)
        self.proj = nn.Linear(TEXT_DIM, d_model)

    def forward(self) -> torch.Tensor:
        z = (self.text - self.text_mean) * self.text_scale
        # Rows without a title stay at zero: they share the projection's bias.
        z = torch.where(_titled(self.text)[:, None], z, torch.zeros_like(z))
        return self.proj(z) * TEXT_GAIN  # [V, D]

    @torch.no_grad()
    def grow(self, text: torch.Tensor) -> None:
        """Append the new rows' features; the known rows' (and the standardiser) stay."""
        self.text = torch.cat([self.text, text.to(self.text.device, self.text.dtype)])
