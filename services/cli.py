"""The `streamtune` command line. Commands only fill in typed settings and call the components."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import typer
from pydantic import BaseModel

from services import cli_loop, cli_stream, cli_tools
from services.demo import DemoConfig
from services.settings import Settings, load_settings

app = typer.Typer(
    name="streamtune",
    help="Continual-learning recommendations from a live Kafka event stream.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    # Help text is reflowed to the terminal (docstrings wrap at 100 columns in the source).
    rich_markup_mode="markdown",
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


def _opt(model: type[BaseModel], field: str, *names: str) -> Any:
    """A typer option for ``model``'s ``field``, its help and default read from the model (the one
    place they are declared). The option itself defaults to None: only what is given reaches it."""
    f = model.model_fields[field]
    default = f.get_default(call_default_factory=True)
    shown = "" if default is None or isinstance(default, bool) else f" (default {default})"
    return typer.Option(*names, help=f"{f.description}{shown}", show_default=False)


@app.command()
def demo(
    ctx: typer.Context,
    events: Annotated[int | None, _opt(DemoConfig, "events")] = None,
    rate: Annotated[float | None, _opt(DemoConfig, "rate")] = None,
    slice_events: Annotated[int | None, _opt(DemoConfig, "slice_events")] = None,
    first_round_events: Annotated[int | None, _opt(DemoConfig, "first_round_events")] = None,
    query_rps: Annotated[float | None, _opt(DemoConfig, "query_rps")] = None,
    live: Annotated[Literal["off", "guard", "canary"] | None, _opt(DemoConfig, "live")] = None,
    keep: Annotated[bool, _opt(DemoConfig, "keep", "--keep")] = False,
    out: Annotated[Path | None, _opt(DemoConfig, "out")] = None,
) -> None:
    """The main job: broker + Ray + ingest + rounds + Serve on MovieLens-100K, replayed live."""
    from services.demo import DemoInterrupted, run_demo

    given = dict(events=events, rate=rate, slice_events=slice_events, live=live, out=out,
                 first_round_events=first_round_events, query_rps=query_rps, keep=keep)  # fmt: skip
    cfg = DemoConfig.model_validate({k: v for k, v in given.items() if v is not None})
    try:
        run_demo(settings_of(ctx), cfg)
    except DemoInterrupted as err:
        typer.echo(str(err), err=True)
        raise typer.Exit(130) from err


if __name__ == "__main__":
    app()
