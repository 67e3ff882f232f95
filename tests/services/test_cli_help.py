"""The CLI's help: docstrings wrap at the source's width, the help reflows to the terminal's."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from services.cli import app


@pytest.mark.parametrize(
    ("args", "sentence"),
    [
        (["up"], "one that keeps dying ends streamtune up with exit status 1, naming it."),
        (["eval"], "everything the user did before it (full ranking, seen items excluded)."),
        (["tune"], "Runs its own local Ray (tune.cpus CPUs), beside any running streamtune up."),
    ],
)
def test_a_paragraph_is_reflowed_not_broken_where_the_source_wraps(
    args: list[str], sentence: str
) -> None:
    res = CliRunner().invoke(app, [*args, "--help"], env={"COLUMNS": "240"}, color=False)
    assert res.exit_code == 0, res.output
    lines = " ".join(line.strip() for line in res.output.splitlines())
    assert sentence in lines, res.output
    # A wide terminal holds the whole sentence on one line: no break where the source wrapped.
    assert any(sentence in line for line in res.output.splitlines()), res.output
