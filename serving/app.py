"""The Ray Serve replica: a versioned recommender behind a FastAPI ingress (the application
bound to a version, with its scaling and options, is ``serving.application.build_app``).

(No `from __future__ import annotations` here: FastAPI must see the real request types.)

Each replica loads model versions read-only from the registry. It serves the version the rollout
controller recorded there (read every ``follow_s``; an app deployed on its own follows rollouts
and rollbacks this way), else the one in its ``user_config`` (set at deploy; a new one is an
in-place update, no restart). A new version is loaded next to the current one and swapped in
atomically, so in-flight and new requests never see a half-loaded model; the previous version
stays loaded for a fast rollback. A version that fails to load is reported to the serving context
once and the replica keeps serving what it had.

Concurrent ``/recommend`` and ``/score`` requests are scored in batches (``serve.batch``, sized by
``batch_max_size`` and ``batch_wait_s``): one look-up of the live histories and one model forward
per batch, all of it by one version snapshot; ranking and the answer stay per request. Live
histories come from the replica's own cache of them, which follows each history shard's change
feed (``serving.replica_histories``); only users it does not hold yet cost a call to their shard.

While a live trial runs (``rollout.live``; the trial is recorded with the serving version), the
replica keeps the trial's other version loaded too, and answers a share of ``/recommend``
requests with both versions' rankings interleaved (``serving.live_answer``). The coin is flipped
as a request arrives; its batch scores the ones drawn by the other version too, in one more
forward over just them, by the batch's snapshot of both versions.
"""

import asyncio
import logging
import math
import random
import time
import uuid
from typing import Any

import torch
from fastapi import FastAPI, HTTPException
from ray import serve
from ray.exceptions import RayActorError

from serving.api import (
    PUBLIC_PATHS,
    HealthResponse,
    ModelsResponse,
    RecommendRequest,
    RecommendResponse,
    ScoreRequest,
    ScoreResponse,
    apply_limits,
    error_responses,
)
from serving.clicks import Served
from serving.config import ServingConfig
from serving.context import CONTROL_NAMESPACE, find_context
from serving.heap import freeze_startup
from serving.http_errors import install_error_handlers, limit_error
from serving.http_guard import HTTPGuard, ReplicaTag
from serving.live_answer import answer, other_version
from serving.replica_histories import ShardedHistories
from serving.scoring import Ask, Loaded, Scored, ask_of, load_version, score_asks
from serving.streak import Streak
from training.registry import LiveTrial, Registry

api = FastAPI(
    title="streamtune",
    version="1",
    description="Fresh recommendations from a continually fine-tuned sequential model.",
)


# serve.ingress pickles `api` (its routes, and the globals they use, by value) when the class
# below is decorated: whatever the handlers call must be defined above this line.
install_error_handlers(api)
_POST_ERRORS = error_responses(400, 413, 422, 500, 503)
log = logging.getLogger(__name__)


@serve.deployment
@serve.ingress(api)
class RecommenderDeployment:
    """One replica. Every setting arrives in ``cfg`` (init args, pickled by Serve, so the same
    locally and on a remote cluster); nothing is read from the replica's environment."""

    def __init__(self, registry: Registry, cfg: ServingConfig) -> None:
        torch.set_num_threads(1)  # many small requests: threads would only contend
        self.registry = registry  # pickled by location and options: a fresh reader here
        self.cfg = ServingConfig.model_validate(cfg)  # the SecretStr key stays masked in reprs
        self.current: Loaded | None = None
        self.previous: Loaded | None = None
        self.replica = uuid.uuid4().hex[:8]
        self.samples: dict[str, list[tuple[float, bool]]] = {}
        self.served: dict[str, Served] = {}
        # A live trial's record, and the version this replica plays against the one it serves
        self.trial: LiveTrial | None = None
        self.other: Loaded | None = None
        self._coins = random.Random()  # who gets an interleaved answer, and team draft's coins
        self._flusher: asyncio.Task[None] | None = None
        self._follower: asyncio.Task[None] | None = None
        self.pinned = 0  # set by reconfigure before any traffic
        self.failed: set[int] = set()
        self._ctx: Any = None
        self.histories = ShardedHistories(self.cfg, CONTROL_NAMESPACE, log)
        self._feed: asyncio.Task[None] | None = None
        self._in_flight = 0  # requests between arrival and their scores (see ``_scored``)
        self.batches = self.batched = 0  # forwards, and requests scored by them
        self._registry_reads = Streak(log, "reading the serving version from the registry")
        self._follows = Streak(log, "following the serving version")
        self._announcements = Streak(log, "waiting for rollout announcements")
        self._reports = Streak(log, "reporting to the serving context")
        self._served_reports = Streak(log, "reporting served items to the history shards")
        self._theirs_failed = Streak(log, "scoring by the live trial's other version")
        # The batcher is the class's (one per replica process); its limits come from the settings.
        self._score_batch.set_max_batch_size(self.cfg.batch_max_size)  # type: ignore[attr-defined]
        self._score_batch.set_batch_wait_timeout_s(self.cfg.batch_wait_s)  # type: ignore[attr-defined]
        freeze_startup()  # the imports' ~550k objects, out of every later full collection

    def __serve_build_asgi_app__(self) -> FastAPI:
        """Serve calls this once per replica, before traffic: the settings go into the app.

        ``self.app`` is this replica's own copy of ``api`` (serve.ingress freezes one), not yet
        started, so middleware can still be added and the schema can still be set.
        """
        app: FastAPI = self.app  # type: ignore[attr-defined]
        app.openapi_schema = apply_limits(app.openapi(), self.cfg)
        app.add_middleware(
            HTTPGuard,
            max_body=self.cfg.max_body_bytes,
            api_key=self.cfg.api_key,
            public=PUBLIC_PATHS,
        )
        app.add_middleware(ReplicaTag, replica=self.replica)  # outermost: every answer is tagged
        return app

    # -- versions -----------------------------------------------------------------------
    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        """The version this deployment was built with; the controller's choice overrides it."""
        self.pinned = int(user_config["version"])
        await self._use(self._target())
        if self._follower is None:
            self._follower = asyncio.get_running_loop().create_task(self._follow_forever())
        if self._feed is None:
            self._feed = asyncio.get_running_loop().create_task(self.histories.follow_forever())

    def _target(self) -> int:
        """The serving version the rollout controller recorded, else the one deployed with.

        An app deployed on its own (`serve deploy`, a RayService) is never redeployed by the
        controller: this is how it rolls forward and back.
        """
        try:
            state = self.registry.rollout_state()
            chosen, self.trial = state.serving, state.trial
        except Exception as err:  # the registry unreachable for a moment: keep what we serve
            keep = self.current.version if self.current is not None else self.pinned
            self._registry_reads.failed(err, f"serving v{keep} meanwhile")
            return keep
        self._registry_reads.ok()
        return chosen if chosen is not None else self.pinned

    async def _follow_forever(self) -> None:
        seen = -1
        while True:
            seen = await self._next_look(seen)
            try:
                target = await asyncio.to_thread(self._target)
                if target not in self.failed:  # a failed load is reported once, not every poll
                    await self._use(target)
                await self._use_trial()
            except Exception as err:  # the follower must outlive any one bad poll
                self._follows.failed(err, "trying again at the next look")
                continue
            self._follows.ok()
            if self._flusher is None:  # report even before the first request: the controller
                self._flusher = asyncio.get_running_loop().create_task(self._flush_forever())

    async def _next_look(self, seen: int) -> int:
        """Wait until the registry is worth reading again: the rollout controller announced a
        version (through the context actor, so a rollout reaches replicas in milliseconds), or
        ``follow_s`` passed (the fallback that works with no announcer at all)."""
        ctx = self._context()
        if ctx is None:
            await asyncio.sleep(self.cfg.follow_s)
            return seen
        try:
            counter: int = await ctx.await_announcement.remote(seen, self.cfg.follow_s)
        except Exception as err:  # the context restarting: poll on the clock meanwhile
            self._announcements.failed(err, f"reading the registry every {self.cfg.follow_s}s")
            self._ctx = None
            await asyncio.sleep(self.cfg.follow_s)
            return seen
        self._announcements.ok()
        return counter

    async def _use(self, version: int) -> None:
        if self.current is not None and self.current.version == version:
            return
        if self.previous is not None and self.previous.version == version:
            self.current, self.previous = self.previous, self.current  # instant rollback
            return
        try:
            loaded = await asyncio.to_thread(load_version, self.registry, version)
        except Exception as err:  # any failure to load keeps the replica on what it had
            self.failed.add(version)
            ctx = self._context()
            if ctx is not None:
                ctx.record_load_failure.remote(str(version), f"{type(err).__name__}: {err}")
            if self.current is None:
                raise
            return
        self.previous, self.current = self.current, loaded

    async def _use_trial(self) -> None:
        """Keep loaded the version the live trial plays against the serving one (or none)."""
        trial, cur = self.trial, self.current
        if trial is None or cur is None:
            self.other = None
            return
        want = other_version(trial, cur.version)
        if self.other is not None and self.other.version == want:
            return
        if self.previous is not None and self.previous.version == want:
            self.other = self.previous
            return
        if want in self.failed:
            return
        try:
            self.other = await asyncio.to_thread(load_version, self.registry, want)
        except Exception as err:  # the trial waits; the failure is the controller's to judge
            self.failed.add(want)
            ctx = self._context()
            if ctx is not None:
                ctx.record_load_failure.remote(str(want), f"{type(err).__name__}: {err}")

    def _context(self) -> Any:
        if self._ctx is None:
            self._ctx = find_context()
        return self._ctx

    def _model(self) -> Loaded:
        if self.current is None:
            raise HTTPException(503, "no model version loaded yet", {"Retry-After": "1"})
        return self.current

    # -- reporting ----------------------------------------------------------------------
    def _record(self, version: int, started: float, ok: bool) -> None:
        ms = (time.perf_counter() - started) * 1000
        self.samples.setdefault(str(version), []).append((ms, ok))
        if self._flusher is None:
            self._flusher = asyncio.get_running_loop().create_task(self._flush_forever())

    async def _flush_forever(self) -> None:
        while True:
            await asyncio.sleep(0.5)
            samples, served = self.samples, self.served
            self.samples, self.served = {}, {}
            await self._report(samples)
            if served:
                try:
                    await self.histories.report_served(served)
                except RayActorError as err:
                    self._served_reports.failed(err, "those items' clicks are not counted")
                else:
                    self._served_reports.ok()

    async def _report(self, samples: dict[str, list[tuple[float, bool]]]) -> None:
        ctx = self._context()
        if ctx is None:  # nobody to report to (no context actor): drop, do not accumulate
            return
        version = self.current.version if self.current else None
        try:
            counters = {**self.histories.counters(), "batches": self.batches,
                        "batched": self.batched}  # fmt: skip
            await ctx.report.remote(self.replica, str(version), samples, counters)
        except RayActorError as err:  # Ray restarts the actor by name: look it up again
            self._reports.failed(err, "these samples are dropped; looking the context up")
            self._ctx = None
        else:
            self._reports.ok()

    async def _histories(self, users: list[str]) -> list[list[str]]:
        """The live histories of ``users``, in order, from their shards (``ShardedHistories``)."""
        return await self.histories.histories(users) if users else []

    async def _scored(self, ask: Ask) -> Scored:
        """This request's share of a batch. Requests that arrive together are scored together
        (``_score_batch``); one alone in the replica is scored at once, a batch of one that skips
        the batcher's queue and task hops (~0.4 ms of a lone request's latency)."""
        self._in_flight += 1
        try:
            await asyncio.sleep(0)  # requests that arrived with this one get counted first
            if self._in_flight == 1:
                m, other = self._snapshot()
                self.batches, self.batched = self.batches + 1, self.batched + 1
                return (await score_asks(m, [ask], self._histories, other))[0]
            return await self._score_batch(ask)
        finally:
            self._in_flight -= 1

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.0)  # set per replica in __init__
    async def _score_batch(self, asks: list[Ask]) -> list[Scored]:
        """Concurrent requests, scored together: one history look-up, one model forward (and
        one of the trial's other version, over the asks drawn for an interleaved answer)."""
        m, other = self._snapshot()  # for the whole batch, even if a swap lands meanwhile
        self.batches, self.batched = self.batches + 1, self.batched + len(asks)
        return await score_asks(m, asks, self._histories, other)

    def _snapshot(self) -> tuple[Loaded, Loaded | None]:
        """The serving version, and the live trial's other version if it is the one that plays
        against it (None while the other one of a new trial or serving version still loads)."""
        m, other, trial = self.current, self.other, self.trial
        assert m is not None, "the endpoints answer 503 before a model is loaded"
        if trial is None or other is None or other.version != other_version(trial, m.version):
            return m, None
        return m, other

    def _interleaves(self) -> bool:
        """The coin: whether this /recommend is drawn for an interleaved answer."""
        trial, other = self.trial, self.other
        return trial is not None and other is not None and self._coins.random() < trial.share

    # -- endpoints ----------------------------------------------------------------------
    @api.post("/recommend", response_model=RecommendResponse, responses=_POST_ERRORS)
    async def recommend(self, req: RecommendRequest) -> RecommendResponse:
        started = time.perf_counter()
        version = self._model().version  # until a batch scores it: that batch's version
        ok = False
        try:
            if req.k > self.cfg.max_k:
                raise limit_error(
                    ["body", "k"], f"k={req.k} is above the limit of {self.cfg.max_k}",
                    "less_than_equal",
                )  # fmt: skip
            got = await self._scored(ask_of(req, self.cfg, self._interleaves()))
            m, rows, version = got.m, got.rows, got.m.version
            items, served, trial = answer(
                got, self.trial, req.k, req.diversity, self._coins, self._theirs_failed
            )
            if req.user_id is not None:
                self.served[req.user_id] = served
            ok = True
            return RecommendResponse(
                items=items, version=m.version, source=got.source, history_len=len(rows),
                unknown_items=len(got.history) - len(rows), trial=trial.id if trial else None,
            )  # fmt: skip
        except HTTPException as err:
            ok = err.status_code < 500
            raise
        finally:
            self._record(version, started, ok)

    @api.post("/score", response_model=ScoreResponse, responses=_POST_ERRORS)
    async def score(self, req: ScoreRequest) -> ScoreResponse:
        self._model()  # 503 before anything else
        if len(req.items) > self.cfg.max_history:
            raise limit_error(
                ["body", "items"], f"at most {self.cfg.max_history} items per request", "too_long"
            )
        got = await self._scored(ask_of(req, self.cfg))
        m, scores = got.m, got.scores()
        out: dict[str, float | None] = {}
        for item in req.items:
            row = m.vocab.index(item)
            val = float(scores[row]) if row is not None else None
            out[item] = val if val is None or math.isfinite(val) else None
        return ScoreResponse(scores=out, version=m.version, source=got.source)

    @api.get("/healthz", response_model=HealthResponse, responses=error_responses(413, 503))
    async def healthz(self) -> HealthResponse:
        m = self._model()
        return HealthResponse(status="ok", version=m.version)

    @api.get("/models", response_model=ModelsResponse, responses=error_responses(413))
    async def models(self) -> ModelsResponse:
        ctx = self._context()
        snap: dict[str, Any] = await ctx.snapshot.remote([]) if ctx is not None else {}
        trial = self.trial.id if self.trial is not None and self.other is not None else None
        return ModelsResponse.of(
            self.registry.versions(), self.registry.champion(), snap,
            self.current.version if self.current else None, trial,
        )  # fmt: skip

    def check_health(self) -> None:
        if self.current is None:
            raise RuntimeError("no model loaded")
