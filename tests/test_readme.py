"""The README is a user's guide that stays true: at most 300 lines, and every command in its
shell blocks either runs here as written (fast, read-only ones) or is named below with the reason
it is not run here. A new command in the README fails this test until it is given one or the
other. Commands that are not run are still checked: a `streamtune` command must parse against the
CLI (command names, options, values), a `make` target is dry-run, a repository path it names must
exist, and a `STREAMTUNE_*` variable must name a setting. Settings (`component.field`) and links
the README and the guide pages name must exist too. No broker, no Ray: a unit test."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import types
import typing
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from services.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
GUIDE = sorted((ROOT / "docs" / "guide").glob("*.md"))
MAX_LINES = 300
STREAMTUNE = Path(sys.executable).with_name("streamtune")

SHELL_BLOCKS = {"", "bash", "sh", "shell", "console"}

# Run as written in a fresh working directory (any state they create lands there); each exits 0.
RUN: dict[str, str] = {
    "streamtune --help": "prints the commands",
    "streamtune status": "reads the buffer, registry and loop state; reports what is not running",
    "streamtune buffer stats": "reads the buffer (an empty one here)",
    "streamtune rollout status": "reads the registry; reports serving as not reachable",
    "streamtune kafka status": "reports whether the embedded broker runs",
}

# Checked with `make -n TARGET` (the target exists and its recipe expands) instead of being run.
DRY_RUN: dict[str, str] = {
    "make demo": "installs, fetches the broker and runs the demo for minutes: "
    "tests/services/test_demo.py runs `streamtune demo` on a slice",
    "make test": "the whole suite, ~27 minutes",
    "make test-fast": "the unit tests, this one included",
}

# Not run here, with the reason.
SKIP: dict[str, str] = {
    "streamtune up": "starts a broker, Ray, ingest, the loop and Serve until Ctrl-C: "
    "tests/services/test_clean_stop.py runs it and stops it mid-round",
    "streamtune train --once": "trains a round with Ray Train on a filled buffer: "
    "tests/services/test_loop_e2e.py runs it",
    "streamtune eval --version 3": "needs a registry holding version 3: "
    "tests/services/test_loop_e2e.py runs `eval`",
    "streamtune rollout promote 3": "moves the champion of a registry holding version 3",
    "streamtune rollout rollback": "moves the champion of a registry back to its parent",
    "streamtune buffer compact": "rewrites the buffer's segments (maintenance, not read-only)",
    "streamtune down": "stops a running `up` and the embedded broker",
    "streamtune kafka up": "starts a Kafka broker (a JVM) on 127.0.0.1:9092: tests/conftest.py "
    "starts the same broker on a free port",
    "streamtune produce --source movielens --rate 2000": "publishes to a running broker "
    "(and reads MovieLens-100K)",
    "streamtune produce --source csv --path mine.csv": "publishes the user's own CSV to a "
    "running broker",
    "streamtune produce --source synthetic --events 50000": "publishes to a running broker",
    "streamtune ingest": "consumes from a running broker until Ctrl-C: "
    "tests/streams/test_ingest_kafka.py runs it",
    'STREAMTUNE_KAFKA__SASL_PASSWORD="$KAFKA_PASSWORD" streamtune -c streamtune.yaml up': (
        "connects to the user's own Kafka cluster: tests/streams/test_security.py runs "
        "SASL_SSL with each mechanism"
    ),
    "streamtune -c cluster.yaml up --address auto --no-serve": "joins an existing Ray "
    "cluster: tests/services/test_cluster.py runs it on a `ray start` cluster",
    "serve deploy deploy/serve.yaml": "deploys onto a running Ray cluster: "
    "tests/services/test_cluster.py deploys it",
    "curl -s -X POST http://127.0.0.1:8000/recommend -H 'content-type: application/json' "
    """-d '{"user_id": "42", "k": 5, "diversity": 0.3}'""": "needs a running Serve app "
    "(`make demo DEMO_ARGS=--keep` or `streamtune up`)",
}


def shell_commands(text: str) -> list[str]:
    """Every command of the shell blocks (bash/sh/shell/console/unlabelled), in order:
    continuation lines joined, comments (whole-line and trailing) and blank lines dropped, a `$ `
    prompt stripped (in a console block only prompted lines are commands; the rest is output)."""
    commands: list[str] = []
    lang: str | None = None
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("```"):
            lang = None if lang is not None else line[3:].strip().lower()
            pending = ""
            continue
        if lang is None or lang not in SHELL_BLOCKS:
            continue
        if pending:
            line = pending + " " + line
            pending = ""
        if line.endswith("\\"):
            pending = line[:-1].rstrip()
            continue
        if line.startswith("$ "):
            line = line[2:].strip()
        elif lang == "console":
            continue
        line = re.sub(r"\s+#\s.*$", "", line)  # a trailing comment
        if line and not line.startswith("#"):
            commands.append(line)
    return list(dict.fromkeys(commands))


def split_env(command: str) -> tuple[dict[str, str], list[str]]:
    """Leading NAME=value assignments, then the argv."""
    argv = shlex.split(command)
    env: dict[str, str] = {}
    while argv and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", argv[0]):
        name, _, value = argv.pop(0).partition("=")
        env[name] = value
    return env, argv


def as_run(argv: list[str]) -> list[str]:
    """The argv to execute: `streamtune` through the venv's entry point, `python` as this one."""
    head = {"streamtune": str(STREAMTUNE), "python": sys.executable, "python3": sys.executable}
    return [head.get(argv[0], argv[0]), *argv[1:]]


def clean_env() -> dict[str, str]:
    """The environment without the developer's own STREAMTUNE_* settings, nor a calling make's
    (a `make test` running this test) flags and jobserver."""
    drop = {"MAKEFLAGS", "MFLAGS", "MAKELEVEL"}
    return {
        k: v for k, v in os.environ.items() if not k.startswith("STREAMTUNE_") and k not in drop
    }


def parse_cli(args: list[str]) -> list[str]:
    """Parse `streamtune ARGS` against the CLI without running it; the command path parsed.
    Raises the CLI's own usage error for an unknown command, option or value."""
    from typer.main import get_command

    from services.cli import app

    cmd: Any = get_command(app)
    name, parent = "streamtune", None
    path: list[str] = []
    while True:
        ctx = cmd.make_context(name, list(args), parent=parent)
        if not hasattr(cmd, "resolve_command"):  # a leaf command: its arguments parsed
            return path
        rest = [*getattr(ctx, "_protected_args", []), *ctx.args]
        assert rest, f"`streamtune {' '.join(args)}` names no command"
        sub_name, cmd, args = cmd.resolve_command(ctx, rest)
        path.append(sub_name)
        name, parent = sub_name, ctx


def model_of(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model inside an annotation (`X`, `X | None`), if any."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        for arg in typing.get_args(annotation):
            found = model_of(arg)
            if found is not None:
                return found
    return None


def setting_exists(path: list[str]) -> bool:
    """Whether `a.b.c` names a field of the settings model (case-insensitive, as env vars are)."""
    model: type[BaseModel] | None = Settings
    for i, part in enumerate(path):
        if model is None:
            return False
        fields = {k.lower(): v for k, v in model.model_fields.items()}
        if part.lower() not in fields:
            return False
        model = model_of(fields[part.lower()].annotation)
        if model is None:  # a plain value (or a dict): the path must end here
            return i == len(path) - 1
    return True


COMMANDS = shell_commands(README.read_text())


def test_readme_is_at_most_300_lines() -> None:
    lines = len(README.read_text().splitlines())
    assert lines <= MAX_LINES, f"README.md has {lines} lines; move details to docs/"


def test_every_readme_command_is_run_or_has_a_reason() -> None:
    assert COMMANDS, "no commands found in the README's shell blocks"
    known = RUN.keys() | DRY_RUN.keys() | SKIP.keys()
    undecided = [c for c in COMMANDS if c not in known]
    assert not undecided, (
        "README commands neither run nor skipped with a reason; add each to RUN, DRY_RUN or "
        f"SKIP in tests/test_readme.py: {undecided}"
    )
    stale = sorted(known - set(COMMANDS))
    assert not stale, f"tests/test_readme.py lists commands the README no longer has: {stale}"
    assert all(reason.strip() for reason in [*RUN.values(), *DRY_RUN.values(), *SKIP.values()])


@pytest.mark.parametrize("command", sorted(RUN))
def test_readme_command_runs(command: str, tmp_path: Path) -> None:
    env, argv = split_env(command)
    done = subprocess.run(
        as_run(argv),
        cwd=tmp_path,
        env={**clean_env(), **env, "COLUMNS": "120"},
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert done.returncode == 0, (
        f"`{command}` exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    )


@pytest.mark.parametrize("command", sorted(DRY_RUN))
def test_readme_make_target_dry_runs(command: str) -> None:
    env, argv = split_env(command)
    assert argv[0] == "make" and len(argv) == 2, command
    done = subprocess.run(
        ["make", "-n", argv[1]],
        cwd=ROOT,
        env={**clean_env(), **env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, f"`make -n {argv[1]}`:\n{done.stdout}\n{done.stderr}"


@pytest.mark.parametrize("command", COMMANDS)
def test_readme_command_names_what_exists(command: str) -> None:
    """Whether run or not: its `streamtune` arguments parse, its repository paths exist and its
    STREAMTUNE_* variables name settings."""
    env, argv = split_env(command)
    for name in env:
        if name.startswith("STREAMTUNE_"):
            path = name.removeprefix("STREAMTUNE_").split("__")
            assert setting_exists(path), f"{name} names no setting"
    if argv[0] == "streamtune" and "--help" not in argv:  # --help is run, and would exit here
        assert parse_cli(argv[1:]), command
    for arg in argv[1:]:
        if re.fullmatch(r"[\w.-]+(/[\w.-]+)+/?", arg):  # a relative path into the repository
            assert (ROOT / arg).exists(), f"`{command}` names {arg}, which does not exist"


def documented_settings(text: str) -> set[str]:
    """Backticked `component.field[.sub]` names whose component is a settings section (file
    names such as `buffer.py` aside)."""
    names = set(re.findall(r"`([a-z_]+(?:\.[a-z_0-9]+)+)`", text))
    files = re.compile(r".*\.(py|md|ya?ml|json|toml|csv|avsc|parquet|png)")
    return {n for n in names if n.split(".")[0] in Settings.model_fields and not files.match(n)}


@pytest.mark.parametrize("page", [README, *GUIDE], ids=lambda p: str(p.relative_to(ROOT)))
def test_named_settings_and_links_exist(page: Path) -> None:
    text = page.read_text()
    missing = sorted(n for n in documented_settings(text) if not setting_exists(n.split(".")))
    assert not missing, f"{page.name} names settings that do not exist: {missing}"
    for env_name in set(re.findall(r"\bSTREAMTUNE_[A-Z0-9_]+", text)):
        path = env_name.removeprefix("STREAMTUNE_").split("__")
        assert setting_exists(path), f"{page.name}: {env_name} names no setting"
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
        if not re.match(r"^[a-z]+:", target):
            assert (page.parent / target).exists(), f"{page.name} links to missing {target}"
