"""The configuration of ``bench.quality`` (``QualityConfig``) and its command line."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from harness.prequential import STRATEGIES, StreamConfig
from harness.product_stream import ProductStream

ALL_STRATEGIES = (*STRATEGIES, "product")


class QualityConfig(BaseModel):
    """Everything one run of the benchmark needs."""

    model_config = ConfigDict(extra="forbid")

    data: Path | None = Field(
        default=None, description="MovieLens-100K folder or user,item,ts[,rating] CSV; None = ML."
    )
    out: Path = Field(default=Path("out"), description="Folder for the plot and results.json.")
    chunks: int = Field(default=10, ge=2, description="Streaming chunks (chunk 0 pretrains).")
    seed: int = Field(default=0, description="Seeds training, negatives and subsampling.")
    seeds: int = Field(
        default=3, ge=1, description="Offline runs with seeds seed..seed+N-1 (mean and std)."
    )
    offline_only: bool = Field(default=False, description="Skip the streaming comparison.")
    streaming_only: bool = Field(
        default=False, description="Skip the offline table (its columns are null)."
    )
    quick: bool = Field(default=False, description="The ~2 minute smoke-test version.")
    offline_epochs: int = Field(
        default=40, ge=1, description="Max epochs of the offline model (early stopping ends most)."
    )
    negatives: int = Field(default=100, ge=1, description="Sampled negatives per case.")
    max_stream_cases: int = Field(
        default=2000, ge=1, description="Test events per chunk (seeded subsample, same for all)."
    )
    stream: StreamConfig = Field(
        default_factory=StreamConfig, description="How the streaming strategies train."
    )
    product: ProductStream = Field(
        default_factory=ProductStream, description="How the product strategy's rounds are fed."
    )
    strategies: tuple[str, ...] = Field(
        default=ALL_STRATEGIES,
        min_length=1,
        description="Streaming strategies to run; a subset skips the cold-item table.",
    )

    @field_validator("strategies")
    @classmethod
    def _known(cls, names: tuple[str, ...]) -> tuple[str, ...]:
        unknown = sorted(set(names) - set(ALL_STRATEGIES))
        if unknown:
            raise ValueError(f"unknown strategies {unknown}; choose among {ALL_STRATEGIES}")
        return tuple(n for n in ALL_STRATEGIES if n in names)  # the tables' fixed order

    @classmethod
    def quick_preset(cls, **overrides: Any) -> QualityConfig:
        """Fewer chunks, epochs and test events: the same code paths in about two minutes."""
        stream = StreamConfig(pretrain_epochs=6, update_epochs=2, full_epochs=4)
        base: dict[str, Any] = {
            "quick": True,
            "chunks": 4,
            "offline_epochs": 4,
            "max_stream_cases": 400,
            "stream": stream,
        }
        return cls(**{**base, **overrides})


def parse_args(argv: list[str] | None = None, description: str | None = None) -> QualityConfig:
    """The flags of ``python -m bench.quality`` (``description`` heads its ``--help``)."""
    p = argparse.ArgumentParser(prog="python -m bench.quality", description=description)
    p.add_argument("--data", type=Path, help="user,item,ts[,rating] CSV (default MovieLens-100K)")
    p.add_argument("--chunks", type=int, help="streaming chunks (default 10; 4 with --quick)")
    p.add_argument("--seed", type=int, default=0, help="first seed (default 0)")
    p.add_argument("--seeds", type=int, default=3, help="offline seeds, mean ± std (default 3)")
    p.add_argument("--out", type=Path, default=Path("out"), help="output folder (default ./out)")
    p.add_argument("--offline-only", action="store_true", help="skip the streaming comparison")
    p.add_argument("--streaming-only", action="store_true", help="skip the offline table")
    p.add_argument("--quick", action="store_true", help="~2 minute version (smoke test)")
    p.add_argument(
        "--strategies",
        help="comma-separated streaming strategies (default: all: "
        f"{','.join(ALL_STRATEGIES)}); a subset skips the cold-item table",
    )
    p.add_argument("--round-events", type=int, help="product: events per round (default 300)")
    a = p.parse_args(argv)
    if a.data is not None and not a.data.exists():
        p.error(f"--data {a.data} does not exist; pass a CSV with user,item,ts[,rating] rows")
    over: dict[str, Any] = {"data": a.data, "seed": a.seed, "seeds": a.seeds, "out": a.out}
    if a.offline_only and a.streaming_only:
        p.error("--offline-only and --streaming-only leave nothing to run; pass one of them")
    over["offline_only"], over["streaming_only"] = a.offline_only, a.streaming_only
    if a.chunks is not None:
        over["chunks"] = a.chunks
    if a.strategies is not None:
        over["strategies"] = tuple(n.strip() for n in a.strategies.split(",") if n.strip())
    if a.round_events is not None:
        over["product"] = ProductStream(round_events=a.round_events)
    try:
        cfg = QualityConfig.quick_preset(**over) if a.quick else QualityConfig(**over)
    except ValidationError as err:
        p.error(str(err))
    # Seeds flow into the training config too, so --seed changes model init and shuffles.
    cfg.stream = cfg.stream.seeded(a.seed)
    return cfg
