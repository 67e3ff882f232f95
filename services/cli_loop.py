"""CLI commands of the running system: up/down/status, one-off training, rollout controls."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.table import Table

from services.loop_state import STATE_FILE
from services.settings import Settings
from serving.config import RolloutConfig
from serving.live_trial import lineage
from streams.buffer import EventBuffer
from training.registry import Registry, RolloutState

if TYPE_CHECKING:
    from services.supervisor import ComponentFailed

console = Console()
SettingsOf = Callable[[typer.Context], Settings]
Command = Callable[..., None]


def register(app: typer.Typer, settings_of: SettingsOf) -> None:
    app.command()(_up(settings_of))
    app.command()(_down(settings_of))
    app.command()(_status(settings_of))
    app.command()(_train(settings_of))
    rollout = typer.Typer(help="Inspect and steer what Serve serves.")
    app.add_typer(rollout, name="rollout")
    rollout.command("status")(_rollout_status(settings_of))
    rollout.command("promote")(_rollout_promote(settings_of))
    rollout.command("rollback")(_rollout_rollback(settings_of))


# Each command is built by a function taking ``settings_of``: typer reads the options from the
# command's own signature, which must hold nothing else.


def _up(settings_of: SettingsOf) -> Command:
    def up(
        ctx: typer.Context,
        address: Annotated[
            str | None, typer.Option(help="Existing Ray cluster (e.g. auto, ray://host:10001).")
        ] = None,
        no_serve: Annotated[bool, typer.Option(help="Train only; no Serve app.")] = False,
    ) -> None:
        """Start broker (embedded), Ray, ingest, history, the loop and Serve; Ctrl-C stops.

        Components run supervised (restarted with backoff when they die); one that keeps dying
        ends `streamtune up` with exit status 1, naming it. Ctrl-C or SIGTERM stops everything it
        started.
        """
        failure = _run_up(_up_settings(settings_of(ctx), address), address, no_serve)
        if failure is not None:
            console.print(f"streamtune up failed: {failure}")
            raise typer.Exit(1)

    return up


def _up_settings(s: Settings, address: str | None) -> Settings:
    if address and "in_cluster" not in s.rollout.model_fields_set:
        # On a cluster the control plane lives in it, not in this process (unless the
        # settings say it runs elsewhere, e.g. with a RayService on a cluster of its own).
        s = s.model_copy(update={"rollout": s.rollout.model_copy(update={"in_cluster": True})})
    return s


def _run_up(s: Settings, address: str | None, no_serve: bool) -> ComponentFailed | None:
    """`up` until a signal or a stop; then everything it started is stopped. Returns the
    component failure that ended it, if one did."""
    from services.cli_stream import ensure_broker
    from services.runtime import Running, start, start_broker_and_ray
    from services.signals import reinstall, stop_on_signals
    from services.stopping import shutdown
    from streams.broker import LocalBroker

    stop = threading.Event()
    running: Running | None = None
    broker = None
    pid_file = s.state_dir / "up.pid"
    with stop_on_signals(stop) as seen:
        try:
            # A broker `up` starts, `up` stops; one that already runs stays up.
            if s.embedded_broker and not LocalBroker(s.broker).status().answering:
                broker = LocalBroker(s.broker)
            started = start_broker_and_ray(address, s, stop, lambda: ensure_broker(s))
            reinstall(stop, seen)
            if started:
                running = start(s, serve_http=not no_serve, stop=stop)
                running.serve_forever()
                pid_file.parent.mkdir(parents=True, exist_ok=True)
                pid_file.write_text(str(os.getpid()))
                where = (
                    f"http://{s.serving.host}:{s.serving.port}" if not no_serve else "(no serve)"
                )
                console.print(f"streamtune up: ingest -> rounds -> {where}. Ctrl-C to stop.")
            while not stop.wait(0.5):  # the main thread only waits: signals reach it at once
                pass
        finally:
            failure = running.supervisor.failure if running is not None else None
            t0 = time.monotonic()
            left = shutdown(running, broker, s.supervisor.stop_timeout_s, say=_say)
            pid_file.unlink(missing_ok=True)
            how = f"signal {seen[0]}" if seen else "failure" if failure else "stop"
            unclean = f"; not clean: {', '.join(left)}" if left else ""
            console.print(
                f"stopped ({how}) in {time.monotonic() - t0:.1f}s: buffered data flushed{unclean}"
            )
    return failure


def _down(settings_of: SettingsOf) -> Command:
    def down(ctx: typer.Context) -> None:
        """Stop what `streamtune up` started: the loop process (gracefully) and the embedded
        broker."""
        from streams.broker import LocalBroker

        s = settings_of(ctx)
        pid_file = s.state_dir / "up.pid"
        if pid_file.exists():
            pid = int(pid_file.read_text())
            try:
                os.kill(pid, signal.SIGTERM)
                for _ in range(120):
                    os.kill(pid, 0)
                    time.sleep(0.5)
            except ProcessLookupError:
                pass
            pid_file.unlink(missing_ok=True)
            console.print(f"stopped streamtune up (pid {pid})")
        if s.embedded_broker and LocalBroker(s.broker).down():
            console.print("stopped the embedded Kafka broker")

    return down


def _status(settings_of: SettingsOf) -> Command:
    def status(
        ctx: typer.Context,
        watch: Annotated[
            float | None,
            typer.Option("--watch", min=0.5, help="Refresh in place every this many seconds."),
        ] = None,
    ) -> None:
        """Broker and lag, buffer, champion, recent rounds, serving versions, freshness."""
        s = settings_of(ctx)
        if watch is None:
            show_status(s, console)
            return
        _watch_status(s, watch)

    return status


def _watch_status(s: Settings, every_s: float) -> None:
    """``status --watch``: the status, redrawn in place every ``every_s`` until Ctrl-C."""
    import io

    from rich.live import Live
    from rich.text import Text

    with Live(console=console, auto_refresh=False) as live:
        try:
            while True:
                text = io.StringIO()
                frame = Console(file=text, width=console.width,
                                force_terminal=console.is_terminal)  # fmt: skip
                show_status(s, frame)
                frame.print(f"[dim]every {every_s:g}s; Ctrl-C to stop[/]")
                live.update(Text.from_ansi(text.getvalue()), refresh=True)
                time.sleep(every_s)
        except KeyboardInterrupt:
            pass


def _train(settings_of: SettingsOf) -> Command:
    def train(
        ctx: typer.Context,
        once: Annotated[
            bool, typer.Option("--once", help="One round on what is new, then exit.")
        ] = False,
    ) -> None:
        """Run a training round on the buffer's new events (Ray Train + DeepSpeed)."""
        from services.loop import ContinualLoop
        from services.runtime import init_ray, round_config

        if not once:
            raise typer.BadParameter("use --once (the continuous loop is `streamtune up`)")
        s = settings_of(ctx)
        init_ray(None, s, dashboard=False)
        reg = s.open_registry()
        # One round: a long-lived training run would be started only to be closed again.
        once_cfg = s.loop.model_copy(update={"long_lived_trainer": False})
        loop = ContinualLoop(
            EventBuffer(s.buffer), reg, round_config(s), once_cfg, s.state_dir / STATE_FILE
        )
        result = loop.run_once()
        if result is None:
            console.print(f"nothing to train: {loop.last_skip}")
            return
        out = {"version": result.version, "promoted": result.promoted, "reason": result.reason}
        console.print(json.dumps({**out, "new_events": result.new_events}))

    return train


def _rollout_status(settings_of: SettingsOf) -> Command:
    def rollout_status(ctx: typer.Context) -> None:
        """Champion, rollbacks and the version each replica serves."""
        import httpx

        s = settings_of(ctx)
        reg = s.open_registry()
        console.print(f"champion: {reg.champion()}")
        for d in reg.decisions()[-10:]:
            console.print(f"  v{d['version']}: {d['decision']} - {d['reason']}")
        for line in live_lines(reg.rollout_state(), s.rollout):
            console.print(line)
        try:
            url = f"http://{s.serving.host}:{s.serving.port}/models"
            console.print(httpx.get(url, timeout=3).json())
        except httpx.HTTPError:
            console.print("serving: not reachable")

    return rollout_status


def live_lines(state: RolloutState, cfg: RolloutConfig) -> list[str]:
    """The live trial, the guard's baseline and any pause, as `rollout status` prints them."""
    out = [f"live evaluation: {cfg.live}"]
    if state.baseline is not None:
        out.append(f"  baseline (last live-verified): v{state.baseline}")
    if state.paused_until is not None and state.paused_until > time.time():
        left = state.paused_until - time.time()
        out.append(f"  promotions paused for {left:.0f} s more: {state.paused_reason}")
    t = state.trial
    if t is None:
        out.append("  no live trial running")
        return out
    test = t.test
    out += [
        f"  trial {t.id} ({t.mode}, {t.share:.0%} of answers interleaved): a = v{t.a}, "
        f"b = v{t.b} (lineage pooled: {lineage(t.b_versions)})",
        f"  {test.impressions} impressions: b won {test.wins}, a won {test.losses}, "
        f"{test.ties} ties; clicks credited: b {t.b_clicks}, a {t.a_clicks}; log LR "
        f"{test.log_lr:.2f} of {cfg.live_test.threshold:.2f} to decide; {test.decision}",
    ]
    return out


def _rollout_promote(settings_of: SettingsOf) -> Command:
    def rollout_promote(ctx: typer.Context, version: int) -> None:
        """Make VERSION the champion; a running `streamtune up` rolls Serve to it within a
        second."""

        reg = settings_of(ctx).open_registry()
        reg.set_champion(version, "manual promote", decision="manual-promote")
        console.print(f"v{version} is champion")

    return rollout_promote


def _rollout_rollback(settings_of: SettingsOf) -> Command:
    def rollout_rollback(ctx: typer.Context) -> None:
        """Point the champion back at its parent; a running `streamtune up` rolls Serve back."""

        reg = settings_of(ctx).open_registry()
        champ = reg.champion()
        if champ is None:
            raise typer.BadParameter("no champion to roll back")
        parent = reg.meta(champ).get("parent")
        if parent is None:
            raise typer.BadParameter(f"v{champ} has no parent to roll back to")
        reg.mark_rolled_back(champ, "manual rollback", to=int(parent))
        console.print(f"rolled back v{champ} -> v{parent}")

    return rollout_rollback


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def show_status(s: Settings, console: Console) -> None:
    """What ``streamtune status`` prints, onto ``console``."""
    from streams.admin import topic_lag
    from streams.broker import LocalBroker

    buf = EventBuffer(s.buffer)
    st = buf.stats()
    console.print(f"buffer: {st.rows:,} rows in {st.segments} segments")
    b = LocalBroker(s.broker).status()
    if not s.embedded_broker or b.answering:
        lag = topic_lag(s.kafka, s.topics.events, buf.watermark())
        console.print(f"broker {s.kafka.bootstrap_servers}: ingest lag {sum(lag.values()):,}")
    else:
        console.print("broker: not running")
    reg = s.open_registry()
    console.print(f"registry: versions {reg.versions()}, champion {reg.champion()}")
    table = Table(
        "version", "kind", "decision", "new events", "NDCG@10 new", "reason", title="rounds"
    )
    for d in [d for d in reg.decisions()][-10:]:
        meta = reg.meta(d["version"]) if d["version"] in reg.versions() else {}
        m = meta.get("metrics", {})
        ndcg = f"{m.get('cand_new_ndcg10', float('nan')):.4f}"
        new = str(meta.get("new_events", ""))
        kind = str(meta.get("kind", ""))
        table.add_row(str(d["version"]), kind, d["decision"], new, ndcg, d["reason"][:60])
    console.print(table)
    _serving_status(s, console)
    champ = reg.champion()
    if champ is not None:
        age = time.time() - reg.meta(champ)["created_at"]
        console.print(f"freshness: champion v{champ} was trained {age:,.0f}s ago")
    _learning(s, reg, console)


def _serving_status(s: Settings, console: Console) -> None:
    """What the app's /models says: the versions served and the live state's shards."""
    import httpx

    try:
        r = httpx.get(f"http://{s.serving.host}:{s.serving.port}/models", timeout=3)
    except httpx.HTTPError:
        console.print("serving: not reachable")
        return
    if r.status_code != 200:  # e.g. 503 until a first version is loaded
        console.print(f"serving: answering {r.status_code}: {r.text[:120]}")
        return
    models = r.json()
    console.print(f"serving: champion {models['champion']}, replicas {models['serving']}")
    shards = models.get("history_shards", [])
    if shards:
        down = [str(sh["shard"]) for sh in shards if not sh["answering"]]
        users = sum(sh["users"] or 0 for sh in shards if sh["answering"])
        console.print(f"live state: {users:,} users in {len(shards)} history shards"
                      + (f" (not answering: {', '.join(down)})" if down else ""))  # fmt: skip


def _learning(s: Settings, reg: Registry, console: Console) -> None:
    """Live model freshness over the last minutes, and the events not (yet) trained on."""
    from services.freshness import live_freshness

    try:
        state = json.loads((s.state_dir / STATE_FILE).read_text())
    except FileNotFoundError:
        console.print("rounds: none recorded yet")
        return
    records = state.get("rounds", [])
    live = live_freshness(records, reg.rollout_state().live, 300.0, time.time())
    fmt = lambda x: "-" if x is None else f"{x:.1f}s"  # noqa: E731
    console.print(
        f"model freshness (events live in the last 5 min, event time -> first serving version): "
        f"p50 {fmt(live['p50_s'])}, p99 {fmt(live['p99_s'])} over ~{live['events']:,} events"
    )
    latest = reg.latest()
    waiting = reg.meta(latest).get("carry_events", 0) if latest is not None else 0
    never = state.get("totals", {}).get("never_trained_events", 0)
    console.print(
        f"events never trained on: {never:,} (let go from the carry); "
        f"{waiting:,} from rejected rounds wait for the next round"
    )
