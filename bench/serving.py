"""Serving cost: /recommend and /score against a bare Serve deployment behind the same ingress.

    python -m bench.serving [--quick] [--seconds S] [--concurrency 1,8,32]
    python -m bench.serving --items 1000000 --rollouts 0     # the same over a 1M-item catalog

One Ray session started as `up` starts it (``serving.ingress``: HAProxy by default), a local
Kafka broker feeding the history component, and a registry of 11 versions of the default model
over the MovieLens-100K catalog. The first 20,000 MovieLens events are the users' live histories;
the following ones stream in at ``--rate`` (100/s) for the whole run, so histories keep changing
(nothing here caches answers).

The floor is a bare Serve deployment in the same session, behind the same ingress: the same
replica count and CPUs per replica as ours, no batching, parsing the JSON body and answering a
10-item body shaped like ours. Per concurrency level the load alternates ours / floor / ours /
floor (closed loop: each client sends its next request when the previous answer arrives), from
a process of its own. CPU per request is summed over every server process (our or the floor's
replicas, HAProxy, Serve's controller, the history component); the client is counted apart.
Then, at concurrency 8, the rollout controller rolls through 10 versions (``--rollouts``) and
non-2xx answers are counted. ``--items N`` grows the catalog to N with synthetic items that no
history holds (every request still ranks all of them); the histories stay MovieLens'.

The weights are untrained (seeded random): cost does not depend on their values.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import random
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from bench.serving_load import Loader, load, merge
from harness.sigterm import exit_on_sigterm
from serving.config import RolloutConfig, ServingConfig
from streams.admin import ensure_topics
from streams.broker import LocalBroker, free_port
from streams.config import BrokerConfig, KafkaConfig, TopicsConfig
from streams.datasets import DEFAULT_ML100K, movielens_100k
from streams.producer import replay
from training.config import ModelConfig
from training.model import Recommender
from training.registry import Registry, VersionContent, write_content
from training.vocab import ItemVocab

console = Console(stderr=True)
OUT = Console(width=150)  # tables for logs, not an 80-column terminal
HISTORY = 20_000  # events that are the users' histories before the load starts
APP, FLOOR = "streamtune", "floor"


def build_registry(root: Path, items: list[str], versions: int) -> Registry:
    """``versions`` versions of the default model over ``items``; v1 is champion."""
    reg = Registry(root, keep=versions + 1)
    cfg = ModelConfig()
    for seed in range(versions):
        torch.manual_seed(seed)
        model = Recommender(cfg, len(items) + 1)

        def write(d: Path, model: Recommender = model) -> None:
            write_content(d, model, VersionContent(ItemVocab(items), list(range(len(items) + 1))))

        reg.register(write, {"model_config": cfg.model_dump(), "watermark": {}})
    reg.set_champion(1, "benchmark start")
    return reg


def floor_app(replicas: int, cpus: float) -> Any:
    from ray import serve

    @serve.deployment(num_replicas=replicas, ray_actor_options={"num_cpus": cpus})
    class Bare:
        """Parses the body and answers 10 items, as /recommend does; nothing else."""

        async def __call__(self, request: Any) -> dict[str, Any]:
            body = json.loads(await request.body())
            items = [{"item_id": str(100 + i), "score": 1.0 / (i + 1)} for i in range(10)]
            return {"items": items, "version": 0, "source": "history",
                    "history_len": len(body), "unknown_items": 0}  # fmt: skip

    return Bare.bind()  # type: ignore[attr-defined]


def _stream(kafka: KafkaConfig, topic: str, events: list[Any], rate: float) -> None:
    replay(events, kafka, topic, rate=rate)


def run(seconds: float, levels: list[int], score_levels: list[int], replicas: int,
        rate: float, catalog: int = 0, rollouts: int = 10) -> dict[str, Any]:  # fmt: skip
    events = movielens_100k(DEFAULT_ML100K)
    items = sorted({e.item_id for e in events}, key=int)
    # A larger catalog: MovieLens' items (the histories' and the /score bodies') plus synthetic
    # ones nobody has seen, so every request ranks all of them.
    extra = [f"synthetic-{i}" for i in range(max(0, catalog - len(items)))]
    users = sorted({e.user_id for e in events[:HISTORY]})
    rng = random.Random(0)
    bodies: dict[str, list[dict[str, Any]]] = {
        "recommend": [{"user_id": u, "k": 10} for u in users],
        "score": [{"user_id": u, "items": rng.sample(items, 20)} for u in users],
    }
    tmp = Path(tempfile.mkdtemp(prefix="bench-serving-"))
    broker = LocalBroker(
        BrokerConfig(state_dir=tmp / "kafka", port=free_port(), controller_port=free_port())
    )
    console.print("starting Kafka ...")
    broker.up()
    kafka = KafkaConfig(bootstrap_servers=broker.cfg.bootstrap)  # the broker just started
    cfg = ServingConfig(replicas=replicas)
    res: dict[str, Any] = {"ingress": cfg.ingress, "items": len(items) + len(extra),
                           "recommend": {}, "score": {}}  # fmt: skip
    try:
        reg = build_registry(tmp / "registry", items + extra, rollouts + 1)
        with _session(kafka, reg, cfg, events, users) as (base, ctl, topic):
            streamer = multiprocessing.get_context("spawn").Process(
                target=_stream, args=(kafka, topic, events[HISTORY:], rate), daemon=True
            )
            streamer.start()
            loader = Loader()
            try:
                for path, lv in (("recommend", levels), ("score", score_levels)):
                    load(f"{base}/{path}", bodies[path], 4, 3.0)  # warm both apps
                    load(f"{base}/{FLOOR}", bodies[path], 4, 3.0)
                    for c in lv:
                        console.print(f"/{path} at concurrency {c}: ours and the floor, "
                                      f"alternating, {seconds:.0f}s each")  # fmt: skip
                        res[path][c] = _alternate(loader, base, path, bodies[path], c, seconds)
                res["counters"] = _counters(ctl.context)
                res["during"] = res["rollout_s"] = None
                if rollouts:
                    console.print(f"concurrency 8 while rolling through {rollouts} versions ...")
                    res["during"], res["rollout_s"] = _under_rollouts(
                        ctl, reg, f"{base}/recommend", bodies["recommend"], rollouts
                    )
            finally:
                loader.close()
                streamer.terminate()
    finally:
        broker.down()
    return res


def _alternate(loader: Loader, base: str, path: str, bodies: list[dict[str, Any]], c: int,
               seconds: float) -> dict[str, Any]:  # fmt: skip
    ours, floor = [], []
    for _ in range(2):
        ours.append(loader.measure(f"{base}/{path}", APP, bodies, c, seconds / 2))
        floor.append(loader.measure(f"{base}/{FLOOR}", FLOOR, bodies, c, seconds / 2))
    return {"ours": merge(ours), "floor": merge(floor)}


@contextlib.contextmanager
def _session(
    kafka: KafkaConfig, reg: Registry, cfg: ServingConfig, events: list[Any], users: list[str]
) -> Iterator[tuple[str, Any, str]]:
    """A local Ray with Serve on ``cfg``'s ingress: our app on v1 with the live history of the
    first events (``users`` are theirs) and the floor app; yields the base URL, the rollout
    controller and the events topic."""
    import ray
    from ray import serve

    from services.runtime import local_ray_environ
    from serving.context import start_context
    from serving.rollout import RolloutController

    topics = TopicsConfig(events="bench-serving.events", dead_letter="bench-serving.dlq")
    ensure_topics(kafka, topics)
    cfg = cfg.model_copy(update={"port": free_port()})
    local_ray_environ(cfg)
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    exit_on_sigterm()  # Ray's handler would end us with no clean-up
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": cfg.port})
        ctx = start_context(kafka, topics, None, cfg)
        time.sleep(3.0)  # the history consumer starts at the end of the topic (no buffer here)
        replay(events[:HISTORY], kafka, topics.events)
        ctl = RolloutController(reg, cfg, RolloutConfig(watch_s=0), ctx)
        ctl.step()
        ctl.close(timeout_s=120.0)  # the whole app deployed before anything is measured
        serve.run(floor_app(cfg.replicas, 0.25), name=FLOOR, route_prefix=f"/{FLOOR}")
        _wait_history(ctx, users)
        yield f"http://127.0.0.1:{cfg.port}", ctl, topics.events
    finally:
        serve.shutdown()  # its proxies stop their HAProxy; ray.shutdown alone can orphan it
        ray.shutdown()


def _counters(ctx: Any) -> dict[str, int]:
    """The replicas' counters, summed: history look-ups answered from their caches (hits) and
    not, users held, forwards (batches) and the requests they scored."""
    import ray

    reps = ray.get(ctx.snapshot.remote([]))["replicas"].values()
    got = [r["counters"] for r in reps if r.get("counters")]
    keys = ("hits", "misses", "users", "batches", "batched")
    return {k: sum(int(c[k]) for c in got) for k in keys}


def _wait_history(ctx: Any, users: list[str]) -> None:
    """Until the history component has caught up with the replayed events."""
    import ray

    deadline = time.time() + 60
    while time.time() < deadline:
        if ray.get(ctx.get_history.remote(users[-1])):
            return
        time.sleep(0.5)
    raise TimeoutError("the history component did not catch up with the replayed events")


def _under_rollouts(
    ctl: Any, reg: Registry, url: str, bodies: list[dict[str, Any]], rollouts: int
) -> tuple[dict[str, Any], list[float]]:
    seconds: list[float] = []
    done = threading.Event()

    def roll() -> None:
        time.sleep(1.0)
        for v in range(2, 2 + rollouts):
            reg.set_champion(v, "benchmark rollout")
            ev = ctl.step()
            seconds.append(ev.seconds if ev else float("nan"))
        done.set()

    t = threading.Thread(target=roll, daemon=True)
    t.start()
    parts = []
    while not done.is_set():
        parts.append(load(url, bodies, 8, 2.0))
    t.join()
    return {
        "requests": sum(len(p["lat"]) for p in parts),
        "errors": sum(p["errors"] for p in parts),
        "versions": sorted({v for p in parts for v in p["versions"]}),
    }, seconds


def _r(x: float | None, nd: int = 2) -> float | None:
    return None if x is None else round(x, nd)


def report(res: dict[str, Any]) -> dict[str, Any]:
    table = Table(title=f"ours vs a bare Serve deployment, both behind ingress={res['ingress']}, "
                  "events streaming (closed loop)")  # fmt: skip
    for col in ("endpoint", "conc.", "p50 ms", "p99 ms", "req/s", "floor p50", "floor p99",
                "floor req/s", "p50 ×", "p99 ×", "req/s ratio", "server CPU ms/req",
                "floor CPU ms/req", "non-2xx"):  # fmt: skip
        table.add_column(col, justify="right")
    levels: dict[str, Any] = {}
    for path in ("recommend", "score"):
        for c, lv in res[path].items():
            o, f = lv["ours"], lv["floor"]
            table.add_row(
                f"/{path}", str(c), f"{o['p50_ms']:.1f}", f"{o['p99_ms']:.1f}", f"{o['rps']:.0f}",
                f"{f['p50_ms']:.1f}", f"{f['p99_ms']:.1f}", f"{f['rps']:.0f}",
                f"{o['p50_ms'] / f['p50_ms']:.2f}", f"{o['p99_ms'] / f['p99_ms']:.2f}",
                f"{o['rps'] / f['rps']:.2f}", f"{o['server_cpu_ms_per_req']:.2f}",
                f"{f['server_cpu_ms_per_req']:.2f}", str(o["errors"] + f["errors"]),
            )  # fmt: skip
            levels[f"{path}@{c}"] = {
                side: {k: (_r(v, 3) if isinstance(v, float) else v) for k, v in d.items()
                       if k != "versions"}
                for side, d in (("ours", o), ("floor", f))
            }  # fmt: skip
    OUT.print(table)
    rec = res["recommend"]
    if 8 in rec:
        t = Table(title="CPU ms per /recommend at concurrency 8, by process")
        for col in ("process", "ours", "floor"):
            t.add_column(col, justify="right")
        roles = sorted(
            set(rec[8]["ours"]["cpu_ms_per_req"]) | set(rec[8]["floor"]["cpu_ms_per_req"])
        )
        for role in roles:
            t.add_row(role, str(rec[8]["ours"]["cpu_ms_per_req"].get(role)),
                      str(rec[8]["floor"]["cpu_ms_per_req"].get(role)))  # fmt: skip
        OUT.print(t)
    hc = res["counters"]
    asked = hc["hits"] + hc["misses"]
    hit_rate = hc["hits"] / asked if asked else None
    OUT.print(
        f"replicas' history caches: {hc['hits']:,} look-ups answered there, "
        f"{hc['misses']:,} read from the history component, {hc['users']:,} users held"
    )
    d = res["during"]
    goals: dict[str, bool | None] = {
        "zero_errors_during_rollouts": None, "rollout_at_most_1.5s": None
    }  # fmt: skip
    if d is None:
        OUT.print("rollouts under load: not run (--rollouts 0)")
    else:
        OUT.print(
            f"during {len(res['rollout_s'])} rollouts (concurrency 8): {d['requests']:,} requests, "
            f"{d['errors']} non-2xx, versions answered {d['versions']}, rollout seconds "
            f"{[round(s, 2) for s in res['rollout_s']]}"
        )
        goals["zero_errors_during_rollouts"] = d["errors"] == 0
        goals["rollout_at_most_1.5s"] = bool(res["rollout_s"]) and max(res["rollout_s"]) <= 1.5
    for path in ("recommend", "score"):
        lv = res[path]
        if 8 in lv:
            o, f = lv[8]["ours"], lv[8]["floor"]
            goals[f"{path}_rps_at_8_at_least_half_floor"] = o["rps"] >= 0.5 * f["rps"]
            goals[f"{path}_p99_at_8_at_most_2x_floor"] = o["p99_ms"] <= 2 * f["p99_ms"]
        if 1 in lv:
            o, f = lv[1]["ours"], lv[1]["floor"]
            goals[f"{path}_p50_at_1_at_most_2x_floor"] = o["p50_ms"] <= 2 * f["p50_ms"]
    return {
        "bench": "serving",
        "ingress": res["ingress"],
        "levels": levels,
        "history_cache_hit_rate": _r(hit_rate, 4),
        "requests_per_forward": _r(hc["batched"] / hc["batches"], 2) if hc["batches"] else None,
        "items": res["items"],
        "errors_during_rollouts": None if d is None else d["errors"],
        "requests_during_rollouts": None if d is None else d["requests"],
        "versions_during_rollouts": None if d is None else d["versions"],
        "rollout_s": None if d is None else [round(s, 2) for s in res["rollout_s"]],
        "goals": goals,
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.serving", description=__doc__.split("\n")[0])
    p.add_argument("--seconds", type=float, default=20.0, help="seconds per level and side")
    p.add_argument("--concurrency", default="1,8,32", help="/recommend levels, comma-separated")
    p.add_argument("--score-concurrency", default="1,8", help="/score levels, comma-separated")
    p.add_argument("--replicas", type=int, default=2, help="Serve replicas (both apps)")
    p.add_argument("--rate", type=float, default=100.0, help="events/s streamed meanwhile")
    p.add_argument("--quick", action="store_true", help="8 s per level and side")
    p.add_argument(
        "--items",
        type=int,
        default=0,
        help="catalog size: MovieLens' 1,682 items plus synthetic ones up to N",
    )
    p.add_argument("--rollouts", type=int, default=10, help="rollouts under load (0: none)")
    a = p.parse_args(argv)
    levels = [int(x) for x in a.concurrency.split(",") if x]
    score_levels = [int(x) for x in a.score_concurrency.split(",") if x]
    if any(c < 1 for c in levels + score_levels):
        p.error("concurrency levels must be positive integers, e.g. 1,8,32")
    seconds = 8.0 if a.quick else a.seconds
    if a.rollouts < 0:
        p.error("--rollouts must be 0 or more")
    record = report(run(seconds, levels, score_levels, a.replicas, a.rate, a.items, a.rollouts))
    print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
