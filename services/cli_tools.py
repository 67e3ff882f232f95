"""CLI commands for looking closer: evaluate a version on the buffer, run the benchmarks."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import numpy as np
import typer
from rich.console import Console
from rich.table import Table

from services.settings import Settings

console = Console()
SettingsOf = Callable[[typer.Context], Settings]
BENCHES = ("ingest", "quality", "train", "serving", "freshness", "faults")


def register(app: typer.Typer, settings_of: SettingsOf) -> None:
    _register_eval(app, settings_of)
    _register_tune(app, settings_of)
    _register_bench(app)


def _register_eval(app: typer.Typer, settings_of: SettingsOf) -> None:
    @app.command("eval")
    def eval_(
        ctx: typer.Context,
        version: Annotated[
            int | None, typer.Option(help="Registry version (default: the champion).")
        ] = None,
        last: Annotated[
            int, typer.Option(min=100, help="Score the buffer's newest N events.")
        ] = 10_000,
        cases: Annotated[int, typer.Option(min=10, help="At most this many of them.")] = 2000,
    ) -> None:
        """NDCG@10 / HR@10 of a version on the buffer's newest events, beside popularity.

        Each event is a next-item question given everything the user did before it (full
        ranking, seen items excluded). Events the version trained on score optimistically;
        events past its watermark are a true test.
        """
        import pyarrow.compute as pc

        from streams.buffer import EventBuffer
        from training.data import next_slice_holdout
        from training.metrics import evaluate, popularity_ndcg

        s = settings_of(ctx)
        reg = s.open_registry()
        v = version if version is not None else reg.champion()
        if v is None:
            raise typer.BadParameter("the registry has no champion yet; train a round first")
        lv = reg.load(v)
        table = EventBuffer(s.buffer).read()
        if table.num_rows < 2:
            raise typer.BadParameter(f"the buffer at {s.buffer.path} holds too few events")
        split = max(0, table.num_rows - last)
        before, recent = table.slice(0, split), table.slice(split)
        before = before.filter(pc.is_in(before["user_id"], value_set=recent["user_id"].unique()))
        hold = next_slice_holdout(before, recent, lv.vocab, lv.model.cfg.max_len, cases, seed=0)
        m = evaluate(lv.model, hold)
        counts = np.zeros(lv.model.n_rows)
        pop = lv.popularity[: lv.model.n_rows]
        counts[: len(pop)] = pop
        pop_ndcg = popularity_ndcg(counts, hold)
        wm = sum(lv.meta["watermark"].values())
        out = Table(title=f"v{v} on the newest {recent.num_rows:,} buffered events")
        for col in ("questions", "NDCG@10", "HR@10", "popularity NDCG@10", "trained on"):
            out.add_column(col, justify="right")
        out.add_row(f"{len(hold):,}", f"{m['ndcg10']:.4f}", f"{m['hr10']:.4f}",
                    f"{pop_ndcg:.4f}", f"{wm:,} offsets")  # fmt: skip
        console.print(out)


def _register_tune(app: typer.Typer, settings_of: SettingsOf) -> None:
    @app.command("tune")
    def tune(
        ctx: typer.Context,
        data: Annotated[
            Path | None,
            typer.Option(help="MovieLens-100K folder or user,item,ts CSV (default: the buffer)."),
        ] = None,
        first: Annotated[
            int | None, typer.Option(min=100, help="Search on the first N events (default: all).")
        ] = None,
        budget_cpu_minutes: Annotated[
            float | None,
            typer.Option(min=0.1, help="CPU minutes for the search (default: tune's setting)."),
        ] = None,
    ) -> None:
        """Search the first version's recipe (size, schedule) with Ray Tune.

        Prints and saves the table of trials. Runs its own local Ray (tune.cpus CPUs), beside
        any running `streamtune up`."""
        from streams.buffer import EventBuffer
        from training.evaluation import load_table
        from training.tune import SearchError, search_events
        from training.tune_result import search_table

        s = settings_of(ctx)
        table = load_table(data) if data is not None else EventBuffer(s.buffer).read()
        if table.num_rows < 100:
            raise typer.BadParameter(f"{table.num_rows} events: the search needs at least 100")
        cfg = s.tune
        if budget_cpu_minutes is not None:
            cfg = cfg.model_copy(update={"budget_cpu_minutes": budget_cpu_minutes})
        try:
            result = search_events(table, s.model, s.trainer, cfg, first)
        except SearchError as err:
            console.print(f"[red]{err}[/red]")
            raise typer.Exit(1) from None
        Console(width=max(console.width, 150)).print(search_table(result))  # 13 columns
        console.print(f"winner {result.best.trial_id}: {result.best.recipe}; table {result.save()}")


def _register_bench(app: typer.Typer) -> None:
    @app.command(
        "bench",
        context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    )
    def bench(
        ctx: typer.Context,
        name: Annotated[str, typer.Argument(help=f"One of: {', '.join(BENCHES)}.")],
    ) -> None:
        """Run a benchmark (python -m bench.NAME); extra arguments pass through, e.g. --quick."""
        if name not in BENCHES:
            raise typer.BadParameter(f"unknown benchmark {name!r}; choose one of {BENCHES}")
        code = subprocess.call([sys.executable, "-m", f"bench.{name}", *ctx.args])
        raise typer.Exit(code)
