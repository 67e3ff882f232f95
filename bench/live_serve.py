"""Live trials through Serve: the product's canary path on replayed requests and the click model.

    python -m bench.live_serve                       # 5 trials per pair, and the latency check
    python -m bench.live_serve --trials 2 --pairs clearly_worse,same

``bench.live`` runs thousands of trials offline through the same interleaving and test code;
this runs a few per pair live, end to end: a real Kafka broker, a local Ray with the Serve app
(2 replicas, the ingress ``up`` uses), the serving context and its history shards, and the
rollout controller in ``rollout.live = canary`` with every answer interleaved. The versions are
``bench.live``'s (same champion training, derivations and seed); each is registered in a real
registry, and every trial registers its candidate afresh (two registrations of the same weights
are two versions: the ``same`` pair has no identity short-cut).

A trial: the pair's a is promoted by hand (served alone), its b is registered and made champion
as a round's gate would, and the controller puts b on trial. The benchmark then replays the
requests after the cut (from a seeded offset), 8 at a time over HTTP, each with its history and
a user id of its own; the click model (printed, fixed before measuring) decides which shown items
the simulated user clicks, and those clicks go to Kafka as click events 1 s after the answer,
where the history shards credit them (answers settle after 4 s here: ``serving.settle_s``).
Between batches the controller steps: it counts settled impressions into the mSPRT and rolls b
out (b better) or discards it (b worse). Impressions to a decision = interleaved answers served
before the controller acted (settled or not), capped at the pair's budget (``same``:
``--same-cap``). Beside each pair: the same versions' trials replayed offline (``bench.live``'s
code, its trial count), the reference the live figures should match.

Then the latency check: the ``same`` pair on trial with every answer interleaved against no trial
(the same two versions loaded), alternating segments at concurrency 8: p50, p99 and non-2xx.
Stdout gets the tables and, last, one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
import uuid
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from rich.console import Console
from rich.table import Table

from bench.live import PAIRS, LiveBenchConfig, Pair, build_models
from bench.live import run_pair as offline_pair
from bench.live_models import Catalog, Replay, replay_of, score
from bench.serving_load import load
from harness.sigterm import exit_on_sigterm
from serving.config import RolloutConfig, ServingConfig
from serving.rollout import RolloutController
from streams.admin import ensure_topics
from streams.broker import LocalBroker, free_port
from streams.config import BrokerConfig, KafkaConfig, TopicsConfig
from streams.events import Event, EventType
from streams.producer import make_producer, replay
from training.evaluation import encode, load_table
from training.model import Recommender
from training.registry import Registry, VersionContent, write_content

OUT = Console(width=160)
err = Console(stderr=True)
CONCURRENCY = 8
BATCH = 32  # requests between two looks of the controller
# A simulated user clicks this long after the answer: people take seconds, and a replica reports
# what it served every 0.5 s (a click that reaches the history shard before the served items
# cannot be credited).
CLICK_DELAY_S = 1.0
SETTLE_S = 4.0  # serving.settle_s here: clicks reach the shards ~1 s after the answer


class Stack:
    """Kafka, a local Ray with Serve, the serving context, a registry and a canary controller."""

    def __init__(self, reg: Registry, ctl: RolloutController, url: str, kafka: KafkaConfig,
                 topic: str) -> None:  # fmt: skip
        self.reg, self.ctl, self.url, self.kafka, self.topic = reg, ctl, url, kafka, topic
        self.producer = make_producer(kafka)
        self.click_delay_s = CLICK_DELAY_S

    def register(self, model: Recommender, catalog: Catalog, name: str) -> int:
        def write(d: Path) -> None:
            write_content(d, model, VersionContent(catalog.vocab))

        meta = {"model_config": model.cfg.model_dump(), "watermark": {}, "bench_version": name}
        return self.reg.register(write, meta, reason=f"bench.live_serve: {name}")

    def serve_alone(self, version: int) -> None:
        """``version`` promoted by hand: rolled out with no trial."""
        self.reg.set_champion(version, "bench: the pair's a", decision="manual-promote")
        deadline = time.time() + 120
        while self.reg.rollout_state().serving != version and time.time() < deadline:
            self.ctl.step()
            time.sleep(0.2)
        assert self.reg.rollout_state().serving == version, "a was not rolled out"

    def start_trial(self, b: int) -> str:
        self.reg.set_champion(b, "bench: passed the offline gate")
        ev = self.ctl.step()
        assert ev is not None and ev.kind == "trial", ev
        trial = self.reg.rollout_state().trial
        assert trial is not None
        self.await_interleaving(trial.id)
        return trial.id

    def await_interleaving(self, trial: str) -> None:
        deadline = time.time() + 60
        body = {"history": [], "k": 10}
        while time.time() < deadline:
            got = [httpx.post(f"{self.url}/recommend", json=body, timeout=10).json()
                   for _ in range(8)]  # fmt: skip
            if all(g.get("trial") == trial for g in got):
                return
            time.sleep(0.2)
        raise RuntimeError(f"replicas did not interleave for trial {trial}")


@contextmanager
def stack(test: Any) -> Iterator[Stack]:
    import ray
    from ray import serve

    from services.runtime import local_ray_environ
    from serving.context import start_context

    tmp = Path(tempfile.mkdtemp(prefix="bench-live-serve-"))
    broker = LocalBroker(
        BrokerConfig(state_dir=tmp / "kafka", port=free_port(), controller_port=free_port())
    )
    broker.up()
    kafka = KafkaConfig(bootstrap_servers=broker.cfg.bootstrap)
    topics = TopicsConfig(events="bench-live.events", dead_letter="bench-live.dlq")
    ensure_topics(kafka, topics)
    # Answers settle SETTLE_S after they are served: the click model's clicks come
    # CLICK_DELAY_S after the answer, and the default 120 s would only make each trial wait.
    cfg = ServingConfig(replicas=2, port=free_port(), settle_s=SETTLE_S)
    local_ray_environ(cfg)
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    exit_on_sigterm()  # Ray's handler would end us with no clean-up
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": cfg.port})
        ctx = start_context(kafka, topics, None, cfg)
        reg = Registry(tmp / "registry", keep=1000)
        rollout = RolloutConfig(live="canary", live_share=1.0, watch_s=0, live_test=test)
        ctl = RolloutController(reg, cfg, rollout, ctx)
        yield Stack(reg, ctl, f"http://127.0.0.1:{cfg.port}", kafka, topics.events)
        ctl.close(timeout_s=60.0)
    finally:
        serve.shutdown()  # its proxies stop their HAProxy; ray.shutdown alone can orphan it
        ray.shutdown()
        broker.down()


async def _post_all(url: str, bodies: list[dict[str, Any]]) -> list[dict[str, Any] | None]:
    sem = asyncio.Semaphore(CONCURRENCY)
    async with httpx.AsyncClient(timeout=30) as c:

        async def one(body: dict[str, Any]) -> dict[str, Any] | None:
            async with sem:
                r = await c.post(f"{url}/recommend", json=body)
                return r.json() if r.status_code == 200 else None

        return list(await asyncio.gather(*(one(b) for b in bodies)))


def _clicks(answers: list[dict[str, Any] | None], futures: list[list[str]], users: list[str],
            cfg: LiveBenchConfig, rng: np.random.Generator) -> list[Event]:  # fmt: skip
    now = int(time.time() * 1000)
    out = []
    for ans, future, user in zip(answers, futures, users, strict=True):
        if ans is None:
            continue
        shown = [it["item_id"] for it in ans["items"]]
        for pos in cfg.clicks.clicks(shown, future, rng):
            out.append(Event(event_id=uuid.uuid4().hex, user_id=user, item_id=shown[pos],
                             event_type=EventType.CLICK, ts=now))  # fmt: skip
    return out


def _body(user: str, history: Any, ids: list[str], k: int) -> dict[str, Any]:
    return {"user_id": user, "k": k, "history": [ids[c - 1] for c in history]}


def run_trial(st: Stack, trial: str, rp: Replay, ids: list[str], cap: int,
              cfg: LiveBenchConfig, rng: np.random.Generator) -> dict[str, Any]:  # fmt: skip
    """Replay requests through the trial until the controller acts or ``cap`` answers."""
    start = int(rng.integers(len(rp.requests)))
    served = failed = clicks = 0
    t0 = time.perf_counter()
    later: deque[tuple[float, list[Event]]] = deque()  # clicks not yet made, when they are due
    while served < cap:
        idx = [(start + served + j) % len(rp.requests) for j in range(BATCH)]
        users = [f"{trial}-{served + j}" for j in range(BATCH)]
        bodies = [_body(u, rp.requests[i].history, ids, cfg.k)
                  for u, i in zip(users, idx, strict=True)]  # fmt: skip
        answers = asyncio.run(_post_all(st.url, bodies))
        failed += sum(a is None for a in answers)
        served += sum(a is not None and a.get("trial") == trial for a in answers)
        futures = [[ids[c - 1] for c in rp.futures[i]] for i in idx]
        made = _clicks(answers, futures, users, cfg, rng)
        clicks += len(made)
        later.append((time.monotonic() + st.click_delay_s, made))
        while later and later[0][0] <= time.monotonic():
            replay(later.popleft()[1], st.kafka, st.topic, producer=st.producer)
        ev = st.ctl.step()
        if ev is not None and ev.kind in ("rollout", "discard"):
            last = _live_decision(st)
            return {"decision": "b_better" if ev.kind == "rollout" else "b_worse",
                    "served": served, "test_impressions": getattr(last, "decided_at", None),
                    "b_won": last.b_won, "a_won": last.a_won, "ties": last.ties,
                    "clicks_sent": clicks, "non_2xx": failed,
                    "seconds": round(time.perf_counter() - t0, 1)}  # fmt: skip
    assert st.ctl.trial is not None
    test = st.ctl.trial.test
    st.ctl.end_trial()
    return {"decision": "continue", "served": served, "test_impressions": None,
            "b_won": test.wins, "a_won": test.losses, "ties": test.ties, "clicks_sent": clicks,
            "non_2xx": failed, "seconds": round(time.perf_counter() - t0, 1)}  # fmt: skip


def _live_decision(st: Stack) -> Any:
    """The controller's ``live-...`` decision line (a discard also logs the rollback after it)."""
    return next(d for d in reversed(st.reg.decision_log()) if d.decision.startswith("live-"))


def run_pair(st: Stack, pair: Pair, models: dict[str, Recommender], catalog: Catalog,
             rp: Replay, cfg: LiveBenchConfig, trials: int,
             same_cap: int) -> dict[str, Any]:  # fmt: skip
    a = st.register(models[pair.a], catalog, f"{pair.name}: a = {pair.a}")
    cap = pair.budget or same_cap
    runs = []
    for t in range(trials):
        st.serve_alone(a)
        b = st.register(models[pair.b], catalog, f"{pair.name}: b = {pair.b}, trial {t}")
        trial = st.start_trial(b)
        rng = np.random.default_rng([cfg.seed, t, len(pair.name)])
        runs.append(run_trial(st, trial, rp, catalog.item_ids, cap, cfg, rng))
        err.print(f"{pair.name} trial {t}: {runs[-1]}")
    right = [r for r in runs if r["decision"] == pair.expect]
    decided = [r for r in runs if r["decision"] != "continue"]
    return {"pair": pair.name, "expect": pair.expect, "cap": cap, "trials": runs,
            "right_within_cap": len(right) if pair.expect != "continue" else None,
            "decided": len(decided),
            "median_served": float(np.median([r["served"] for r in runs])),
            "non_2xx": sum(r["non_2xx"] for r in runs)}  # fmt: skip


def latency(st: Stack, models: dict[str, Recommender], catalog: Catalog, rp: Replay,
            seconds: float, rounds: int) -> dict[str, Any]:  # fmt: skip
    """p50/p99 at concurrency 8 with every answer interleaved against no trial."""
    from serving import live_trial

    a = st.register(models["champion"], catalog, "latency: a")
    b = st.register(models["copy"], catalog, "latency: b")
    st.serve_alone(a)
    ids = catalog.item_ids
    bodies = [_body(f"lat-{i}", r.history, ids, 10) for i, r in enumerate(rp.requests[:2000])]
    parts: dict[str, list[dict[str, Any]]] = {"interleaved": [], "plain": []}
    load(f"{st.url}/recommend", bodies, CONCURRENCY, 3.0)  # warm-up
    for _ in range(rounds):
        for mode in ("interleaved", "plain"):
            if mode == "interleaved":
                st.ctl.trial = live_trial.new_trial(st.ctl, "canary", a, b)
                st.ctl.save_and_announce()
                st.await_interleaving(st.ctl.trial.id)
            else:
                st.ctl.end_trial()
                time.sleep(1.5)  # the replicas read the record at their next look
            parts[mode].append(load(f"{st.url}/recommend", bodies, CONCURRENCY, seconds))
    out: dict[str, Any] = {}
    for mode, ps in parts.items():
        lat = np.asarray([x for p in ps for x in p["lat"]])
        out[mode] = {"p50_ms": round(float(np.percentile(lat, 50)), 2),
                     "p99_ms": round(float(np.percentile(lat, 99)), 2),
                     "requests": int(lat.size),
                     "non_2xx": sum(int(p["errors"]) for p in ps)}  # fmt: skip
    out["p99_ratio"] = round(out["interleaved"]["p99_ms"] / out["plain"]["p99_ms"], 3)
    return out


def print_table(pairs: list[dict[str, Any]]) -> None:
    """Live trials per pair beside the same versions' offline trials."""
    table = Table(title="live trials through Serve (canary, every answer interleaved)")
    for col in ("pair", "expect", "cap", "live right", "live decided", "median served",
                "clicks/answer", "b wins (decisive)", "offline right", "offline b wins",
                "non-2xx"):  # fmt: skip
        table.add_column(col)
    for r in pairs:
        n, off = len(r["trials"]), r["offline"]
        clicks = sum(t["clicks_sent"] for t in r["trials"]) / max(
            1, sum(t["served"] for t in r["trials"])
        )
        b_won = sum(t["b_won"] for t in r["trials"])
        decisive = b_won + sum(t["a_won"] for t in r["trials"])
        table.add_row(r["pair"], r["expect"], str(r["cap"]),
                      f"{r['right_within_cap']}/{n}" if r["right_within_cap"] is not None else "-",
                      f"{r['decided']}/{n}", f"{r['median_served']:.0f}", f"{clicks:.3f}",
                      f"{b_won / decisive:.3f}" if decisive else "-",
                      str(off["within_budget_share"] if off["within_budget_share"] is not None
                          else f"decided {off['decided_share']}"),
                      str(off["b_win_share"]), str(r["non_2xx"]))  # fmt: skip
    OUT.print(table)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.live_serve",
                                description=__doc__.split("\n")[0])  # fmt: skip
    p.add_argument("--trials", type=int, default=5, help="live trials per pair")
    p.add_argument("--pairs", default=",".join(pr.name for pr in PAIRS), help="comma-separated")
    p.add_argument("--same-cap", type=int, default=2000, help="answers per 'same' trial")
    p.add_argument("--latency-s", type=float, default=8.0, help="seconds per latency segment")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--click-delay-s", type=float, default=CLICK_DELAY_S,
                   help="seconds from an answer to its simulated clicks")  # fmt: skip
    a = p.parse_args(argv)
    cfg = LiveBenchConfig.quick_preset(seed=a.seed, requests=None)
    t0 = time.perf_counter()
    inter = encode(load_table())
    rp = replay_of(inter, cfg.train_share, None, cfg.clicks.window, cfg.seed)
    models, catalog, knobs = build_models(cfg, rp, t0)
    wanted = [pr for pr in PAIRS if pr.name in a.pairs.split(",") and pr.a in models
              and pr.b in models]  # fmt: skip
    OUT.print(f"click model (fixed before measuring): {cfg.clicks.describe()}")
    OUT.print(f"test: mSPRT alpha {cfg.test.alpha}, prior sd {cfg.test.prior_sd}; "
              f"every answer interleaved; {a.trials} live trials per pair")  # fmt: skip
    # The reference, in the same run: the same versions' trials replayed offline through the
    # same interleaving and test code (bench.live), cfg.trials per pair.
    scored = {name: score(catalog.scorer(m), rp, cfg.k) for name, m in models.items()}
    offline = {pr.name: offline_pair(pr, i, scored, rp, cfg, t0)["interleaving"]
               for i, pr in enumerate(wanted)}  # fmt: skip
    with stack(cfg.test) as st:
        st.click_delay_s = a.click_delay_s
        pairs = [run_pair(st, pr, models, catalog, rp, cfg, a.trials, a.same_cap) for pr in wanted]
        for r in pairs:
            r["offline"] = offline[r["pair"]]
        lat = latency(st, models, catalog, rp, a.latency_s, 3)
    print_table(pairs)
    OUT.print(f"latency at concurrency {CONCURRENCY}: {lat}")
    out = {"bench": "live_serve", "click_model": cfg.clicks.model_dump(),
           "test": cfg.test.model_dump(), "weaker_versions": knobs, "pairs": pairs,
           "latency": lat, "seconds": round(time.perf_counter() - t0, 1)}  # fmt: skip
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
