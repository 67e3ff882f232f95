"""The `streamtune` command line. Commands only fill in typed settings and call the components."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from services import cli_loop, cli_stream
from services.settings import Settings, load_settings

app = typer.Typer(
    name="streamtune",
    help="Continual-learning recommendations from a live Kafka event stream.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)


@app.callback()
def main(
    ctx: typer.Context,
    config: Annotated[
        Path | None,
        typer.Option("--config", "-c", help="YAML or TOML settings file (env STREAMTUNE_* wins)."),
    ] = None,
    state_dir: Annotated[
        Path | None, typer.Option(help="Root of local state (broker, buffer, registry).")
    ] = None,
) -> None:
    """Global options; every command reads the same settings."""
    overrides = {"state_dir": state_dir} if state_dir is not None else {}
    ctx.obj = load_settings(config, **overrides)


def settings_of(ctx: typer.Context) -> Settings:
    obj = ctx.find_root().obj
    assert isinstance(obj, Settings)
    return obj


cli_stream.register(app, settings_of)
cli_loop.register(app, settings_of)


@app.command()
def demo(
    ctx: typer.Context,
    rate: Annotated[
        float | None, typer.Option(help="Replay rate in events/s; omit for as fast as possible.")
    ] = None,
) -> None:
    """The main job on one machine: broker up, replay MovieLens-100K, ingest, summarise."""
    from rich.console import Console

    from services.demo import run_ingest_demo

    run_ingest_demo(settings_of(ctx), rate, Console())


if __name__ == "__main__":
    app()
