"""The Ray Serve application: versioned recommender replicas behind a FastAPI ingress.

(No `from __future__ import annotations` here: FastAPI must see the real request types.)

Each replica loads model versions read-only from the registry. ``reconfigure(user_config)`` is how
a version change arrives (an in-place update, no restart): the new version is loaded next to the
current one and swapped in atomically, so in-flight and new requests never see a half-loaded
model; the previous version stays loaded for a fast rollback. A version that fails to load is
reported to the serving context and the replica keeps serving what it had.
"""

import asyncio
import math
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse
from ray import serve
from ray.serve import Application
from starlette.middleware.base import BaseHTTPMiddleware, RequestResponseEndpoint
from starlette.responses import Response

from serving.api import (
    ModelsResponse,
    RecommendRequest,
    RecommendResponse,
    ScoredItem,
    ScoreRequest,
    ScoreResponse,
)
from serving.config import ServingConfig
from serving.context import CONTEXT_ACTOR
from serving.mmr import mmr
from training.data import left_pad
from training.model import Recommender
from training.registry import Registry
from training.vocab import ItemVocab

api = FastAPI(
    title="streamtune",
    version="1",
    description="Fresh recommendations from a continually fine-tuned sequential model.",
)


@dataclass(frozen=True)
class Loaded:
    version: int
    model: Recommender
    vocab: ItemVocab
    unit_emb: torch.Tensor  # [V, D] unit-norm rows, for MMR
    popularity: torch.Tensor  # [V] log-count prior, for users with no usable history


def load_version(registry: Registry, version: int) -> Loaded:
    lv = registry.load(version)  # verifies hashes; raises on a bad version
    emb = lv.model.item_embeddings().detach()
    unit = emb / emb.norm(dim=1, keepdim=True).clamp(min=1e-9)
    pop_file = lv.path / "popularity.json"
    counts = torch.zeros(len(lv.vocab))
    if pop_file.exists():
        import json

        raw = torch.tensor(json.loads(pop_file.read_text()), dtype=torch.float32)
        counts[: len(raw)] = raw[: len(counts)]
    pop = torch.log1p(counts)
    pop[0] = float("-inf")
    return Loaded(version, lv.model, lv.vocab, unit, pop)


class _Limits(BaseHTTPMiddleware):
    """Oversized bodies get 413 and, when configured, a missing API key 401 - before parsing."""

    def __init__(self, app: Any, max_body: int, api_key: str | None) -> None:
        super().__init__(app)
        self.max_body, self.api_key = max_body, api_key

    async def dispatch(self, request: Request, call_next: RequestResponseEndpoint) -> Response:
        size = request.headers.get("content-length")
        if size is not None and size.isdigit() and int(size) > self.max_body:
            return JSONResponse(
                {"detail": f"body of {size} bytes exceeds {self.max_body}"}, status_code=413
            )
        public = request.url.path in ("/healthz", "/docs", "/openapi.json")
        if self.api_key and not public and request.headers.get("x-api-key") != self.api_key:
            return JSONResponse({"detail": "missing or wrong X-API-Key"}, status_code=401)
        return await call_next(request)


_cfg_from_env = ServingConfig()  # middleware is installed at import; limits follow env config
api.add_middleware(
    _Limits,
    max_body=int(
        os.environ.get("STREAMTUNE_SERVING__MAX_BODY_BYTES", _cfg_from_env.max_body_bytes)
    ),
    api_key=os.environ.get("STREAMTUNE_SERVING__API_KEY"),
)


@serve.deployment
@serve.ingress(api)
class RecommenderDeployment:
    def __init__(self, registry_path: str, cfg: dict[str, Any]) -> None:
        torch.set_num_threads(1)  # many small requests: threads would only contend
        self.registry = Registry(Path(registry_path))
        self.cfg = ServingConfig(**cfg)
        self.current: Loaded | None = None
        self.previous: Loaded | None = None
        self.replica = uuid.uuid4().hex[:8]
        self.samples: dict[str, list[tuple[float, bool]]] = {}
        self.served: dict[str, tuple[str, list[str]]] = {}
        self._flusher: asyncio.Task[None] | None = None
        self._ctx: Any = None

    # -- versions -----------------------------------------------------------------------
    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        version = int(user_config["version"])
        if self.current is not None and self.current.version == version:
            return
        if self.previous is not None and self.previous.version == version:
            self.current, self.previous = self.previous, self.current  # instant rollback
            return
        try:
            loaded = await asyncio.to_thread(load_version, self.registry, version)
        except Exception as err:  # any failure to load keeps the replica on what it had
            ctx = self._context()
            if ctx is not None:
                ctx.record_load_failure.remote(str(version), f"{type(err).__name__}: {err}")
            if self.current is None:
                raise
            return
        self.previous, self.current = self.current, loaded

    def _context(self) -> Any:
        if self._ctx is None:
            import ray

            try:
                self._ctx = ray.get_actor(CONTEXT_ACTOR)
            except ValueError:
                return None
        return self._ctx

    def _model(self) -> Loaded:
        if self.current is None:
            raise HTTPException(503, "no model version loaded yet")
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
            ctx = self._context()
            if ctx is None:
                continue
            samples, served = self.samples, self.served
            self.samples, self.served = {}, {}
            version = self.current.version if self.current else None
            ctx.report.remote(self.replica, str(version), samples, served)

    async def _history(self, req: RecommendRequest | ScoreRequest) -> list[str]:
        if req.history is not None:
            if len(req.history) > self.cfg.max_history:
                raise HTTPException(
                    422, f"history has {len(req.history)} items; at most {self.cfg.max_history}"
                )
            return req.history
        ctx = self._context()
        if ctx is None or req.user_id is None:
            return []
        hist: list[str] = await ctx.get_history.remote(req.user_id)
        return hist

    def _scores(self, m: Loaded, rows: list[int]) -> tuple[torch.Tensor, str]:
        if not rows:
            return m.popularity.clone(), "popularity"
        x = torch.from_numpy(left_pad(rows, m.model.cfg.max_len))[None]
        with torch.no_grad():
            s = m.model.score(x)[0]
        if not torch.isfinite(s[1:]).all():
            raise HTTPException(500, f"model version {m.version} produced non-finite scores")
        return s, "history"

    # -- endpoints ----------------------------------------------------------------------
    @api.post("/recommend", response_model=RecommendResponse)
    async def recommend(self, req: RecommendRequest) -> RecommendResponse:
        started = time.perf_counter()
        m = self._model()
        ok = False
        try:
            if req.k > self.cfg.max_k:
                raise HTTPException(422, f"k={req.k} is above the limit of {self.cfg.max_k}")
            history = await self._history(req)
            rows = m.vocab.encode(history)
            scores, source = self._scores(m, rows)
            if req.exclude_seen and rows:
                scores[torch.tensor(rows)] = float("-inf")
            n_cand = min(int(torch.isfinite(scores).sum()), max(req.k * 5, 50))
            cand = torch.topk(scores, n_cand).indices
            picked = mmr(scores, m.unit_emb, cand, req.k, req.diversity)
            items = [ScoredItem(item_id=m.vocab.item(r), score=float(scores[r])) for r in picked]
            if req.user_id is not None:
                self.served[req.user_id] = (str(m.version), [i.item_id for i in items])
            ok = True
            return RecommendResponse(
                items=items, version=m.version, source=source, history_len=len(rows),
                unknown_items=len(history) - len(rows),
            )  # fmt: skip
        except HTTPException as err:
            ok = err.status_code < 500
            raise
        finally:
            self._record(m.version, started, ok)

    @api.post("/score", response_model=ScoreResponse)
    async def score(self, req: ScoreRequest) -> ScoreResponse:
        m = self._model()
        if len(req.items) > self.cfg.max_history:
            raise HTTPException(422, f"at most {self.cfg.max_history} items per request")
        history = await self._history(req)
        scores, source = self._scores(m, m.vocab.encode(history))
        out: dict[str, float | None] = {}
        for item in req.items:
            row = m.vocab.index(item)
            val = float(scores[row]) if row is not None else None
            out[item] = val if val is None or math.isfinite(val) else None
        return ScoreResponse(scores=out, version=m.version, source=source)

    @api.get("/healthz")
    async def healthz(self) -> dict[str, Any]:
        m = self._model()
        return {"status": "ok", "version": m.version}

    @api.get("/models", response_model=ModelsResponse)
    async def models(self) -> ModelsResponse:
        ctx = self._context()
        snap: dict[str, Any] = await ctx.snapshot.remote() if ctx is not None else {}
        serving = {
            r: (int(d["version"]) if d.get("version") not in (None, "None") else None)
            for r, d in snap.get("replicas", {}).items()
        }
        return ModelsResponse(
            versions=self.registry.versions(),
            champion=self.registry.champion(),
            serving=serving,
            this_replica=self.current.version if self.current else None,
            load_failures=snap.get("load_failures", {}),
        )

    def check_health(self) -> None:
        if self.current is None:
            raise RuntimeError("no model loaded")


def build_app(registry_path: Path, cfg: ServingConfig, version: int) -> Application:
    """The application bound to one version; redeploying with another version is in-place."""
    if cfg.max_replicas is not None and cfg.max_replicas > cfg.replicas:
        scaling: dict[str, Any] = {
            "autoscaling_config": {
                "min_replicas": cfg.replicas,
                "max_replicas": cfg.max_replicas,
                "target_ongoing_requests": cfg.target_ongoing_requests,
            }
        }
    else:
        scaling = {"num_replicas": cfg.replicas}
    deployment = RecommenderDeployment.options(  # type: ignore[attr-defined]
        name="recommender",
        max_ongoing_requests=cfg.max_ongoing_requests,
        user_config={"version": version},
        ray_actor_options={"num_cpus": 0.25},
        graceful_shutdown_timeout_s=5,
        health_check_period_s=2,
        **scaling,
    )
    # serve.run gives code deployed from Python a random version, so every redeploy restarts
    # all replicas. A version derived from the serving code makes a new user_config a
    # lightweight in-place update (reconfigure), as with `serve deploy` config files.
    deployment._version = code_version()
    return deployment.bind(str(registry_path.resolve()), cfg.model_dump())


def code_version() -> str:
    import hashlib

    import training.model

    h = hashlib.sha256()
    for mod in (__file__, training.model.__file__):
        h.update(Path(mod).read_bytes())
    return h.hexdigest()[:16]


def build_from_env(args: dict[str, Any] | None = None) -> Application:
    """Entry point for Serve config files and KubeRay: settings from STREAMTUNE_* variables."""
    from services.settings import load_settings

    s = load_settings()
    reg = Registry(s.state_dir / "registry")
    champion = reg.champion()
    if champion is None:
        raise LookupError(f"no champion in {reg.root}: train a first version before serving")
    return build_app(reg.root, s.serving, champion)
