"""The `streamtune` command line. Commands only fill in typed settings and call the components."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import typer

from services import cli_loop, cli_stream, cli_tools
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
cli_tools.register(app, settings_of)


@app.command()
def demo(
    ctx: typer.Context,
    events: Annotated[
        int | None, typer.Option(help="Replay only the first N MovieLens events (default all).")
    ] = None,
    rate: Annotated[float, typer.Option(help="Replay rate in events/s.")] = 300.0,
    slice_events: Annotated[
        int, typer.Option(help="Events per row of the report (a slice of the replay).")
    ] = 12_000,
    first_round_events: Annotated[
        int, typer.Option(help="Events published as a backlog before the loop starts.")
    ] = 20_000,
    query_rps: Annotated[float, typer.Option(help="Live /recommend queries per second.")] = 20.0,
    live: Annotated[
        Literal["off", "guard", "canary"],
        typer.Option(help="rollout.live for the run: live trials (guard), or none (off)."),
    ] = "guard",
    keep: Annotated[bool, typer.Option("--keep", help="Keep serving until Ctrl-C.")] = False,
    out: Annotated[Path, typer.Option(help="Folder for the plot and demo.json.")] = Path("out"),
) -> None:
    """The main job: broker + Ray + ingest + rounds + Serve on MovieLens-100K, replayed live."""
    from services.demo import DemoConfig, DemoInterrupted, run_demo

    cfg = DemoConfig(
        events=events, rate=rate, slice_events=slice_events,
        first_round_events=first_round_events, query_rps=query_rps, live=live, keep=keep,
        out=out,
    )  # fmt: skip
    try:
        run_demo(settings_of(ctx), cfg)
    except DemoInterrupted as err:
        typer.echo(str(err), err=True)
        raise typer.Exit(130) from err


if __name__ == "__main__":
    app()
