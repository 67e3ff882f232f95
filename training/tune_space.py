"""What the first version's recipe search chooses among (``training.tune`` runs it).

One space for every data set: no table of recipes keyed by data set. The only data-driven part
is the loss's negatives, searched where the catalog is large enough for the loss to be sampled
(``ModelConfig.loss`` 'auto' above ``sampled_above`` rows, or 'sampled'); a full softmax has none.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field

from streams.config_base import StrictConfig
from training.config import ModelConfig, TrainerConfig

WIDTHS = (32, 64, 128)
DEPTHS = (1, 2)
HEADS = (1, 2, 4)  # every one divides every width
BATCHES = (16, 32, 64, 128)
NEGATIVES = (64, 128, 256, 512)
LR_RANGE = (1e-3, 1e-2)
DROPOUT_RANGE = (0.1, 0.5)


class Recipe(StrictConfig):
    """One point of the space: the model's size and the optimizer's schedule."""

    d_model: int = Field(default=32, description="Hidden size = item row size.")
    n_layers: int = Field(default=1, description="Transformer blocks.")
    n_heads: int = Field(default=2, description="Attention heads per block.")
    dropout: float = Field(default=0.2, description="Dropout everywhere.")
    lr: float = Field(default=5e-3, description="AdamW peak learning rate.")
    batch_size: int = Field(default=32, description="Sequences per step.")
    num_negatives: int | None = Field(
        default=None, description="Sampled-softmax negatives; None = the model's own setting."
    )

    @classmethod
    def of(cls, model: ModelConfig, trainer: TrainerConfig) -> Recipe:
        """The recipe a lineage trains with today (the search's first point)."""
        return cls(
            d_model=model.d_model,
            n_layers=model.n_layers,
            n_heads=model.n_heads,
            dropout=model.dropout,
            lr=trainer.lr,
            batch_size=trainer.batch_size,
        )

    def apply(
        self, model: ModelConfig, trainer: TrainerConfig
    ) -> tuple[ModelConfig, TrainerConfig]:
        """``model`` and ``trainer`` with this recipe's settings (validated again)."""
        m = {"d_model": self.d_model, "n_layers": self.n_layers, "n_heads": self.n_heads,
             "dropout": self.dropout}  # fmt: skip
        if self.num_negatives is not None:
            m["num_negatives"] = self.num_negatives
        new_model = ModelConfig.model_validate({**model.model_dump(), **m})
        t = {"lr": self.lr, "batch_size": self.batch_size}
        return new_model, TrainerConfig.model_validate({**trainer.model_dump(), **t})


def samples_loss(model: ModelConfig, n_items: int) -> bool:
    """Whether ``model`` trains with the sampled softmax on a catalog of ``n_items``."""
    return model.loss == "sampled" or (model.loss == "auto" and n_items + 1 > model.sampled_above)


def search_space(model: ModelConfig, n_items: int) -> dict[str, Any]:
    """Ray Tune's distributions over ``Recipe``'s fields."""
    from ray import tune

    space: dict[str, Any] = {
        "d_model": tune.choice(list(WIDTHS)),
        "n_layers": tune.choice(list(DEPTHS)),
        "n_heads": tune.choice(list(HEADS)),
        "dropout": tune.uniform(*DROPOUT_RANGE),
        "lr": tune.loguniform(*LR_RANGE),
        "batch_size": tune.choice(list(BATCHES)),
    }
    if samples_loss(model, n_items):
        space["num_negatives"] = tune.choice(list(NEGATIVES))
    return space
