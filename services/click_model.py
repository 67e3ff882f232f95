"""A simulated user's clicks on a shown list, from what that user really did next in a log.

The model knows two things and nothing more:

1. **Relevance from the log.** A shown item is one the user wants iff the user interacts with it
   within their next ``window`` events in the replayed stream (counted from the request on, so
   the event the request came just before is the first of them).
2. **Position bias.** The user examines position ``i`` (0-based) with probability
   ``1 / (i + 1) ** eta``, independently of the other positions and of the items; a click is a
   relevant item at an examined position.

What it leaves out, on purpose (its limits, docs/design-live-evaluation.md): the user's future
events were produced under whatever the logging system showed, not under the list shown here,
so a list cannot *cause* an interaction; the user never clicks an item they would not have
interacted with anyway; clicks do not depend on each other (no cascade, no satisfaction); the
window counts events, not time. It judges a ranking by how much of the user's own near future it
puts where the user looks, which is what next-slice NDCG measures with a different discount.

The simulated user of `streamtune demo` and of the benchmarks (``bench.live``), never of the
product's own path: serving never imports it.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import numpy as np
from pydantic import ConfigDict, Field

from streams.config_base import StrictConfig


class ClickModel(StrictConfig):
    """The click model's two parameters, fixed before measuring (the benchmark prints them)."""

    model_config = ConfigDict(frozen=True)  # the strict base's, and fixed once made

    window: int = Field(
        default=10,
        ge=1,
        description="A shown item counts as wanted iff the user interacts with it within their "
        "next this-many events of the replayed stream (the request's own event first).",
    )
    eta: float = Field(
        default=1.0,
        ge=0.0,
        description="Position bias: position i (0-based) is examined with probability "
        "1/(i+1)^eta (0: every position examined).",
    )

    def examination(self, k: int) -> np.ndarray:
        """[k] probability that each position is examined."""
        return 1.0 / np.power(np.arange(1, k + 1, dtype=np.float64), self.eta)

    def relevant(
        self, items: Sequence[Hashable], future: Sequence[Hashable] | np.ndarray
    ) -> np.ndarray:
        """[len(items)] bool: which shown items are among the first ``window`` of ``future``
        (the user's events from the request on, oldest first)."""
        wanted = set(future[: self.window])
        return np.fromiter((it in wanted for it in items), dtype=bool, count=len(items))

    def examined(self, n: int, k: int, rng: np.random.Generator) -> np.ndarray:
        """[n, k] bool: which positions each of ``n`` simulated impressions examines."""
        return rng.random((n, k)) < self.examination(k)

    def clicks(
        self,
        items: Sequence[Hashable],
        future: Sequence[Hashable] | np.ndarray,
        rng: np.random.Generator,
    ) -> list[int]:
        """Clicked positions (0-based) of one shown list."""
        hit = self.relevant(items, future) & self.examined(1, len(items), rng)[0]
        return [int(i) for i in np.flatnonzero(hit)]

    def describe(self) -> str:
        return (
            f"click iff the item is among the user's next {self.window} events and its position "
            f"i (0-based) is examined, P(examine i) = 1/(i+1)^{self.eta:g}"
        )
