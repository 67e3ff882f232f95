"""The HTTP contract: request, response and error models (they are the OpenAPI schema).

Every rule a handler enforces is stated in the schema: the "user_id or history" rule as an
``anyOf`` on the request object, and the limits that come from the settings (largest k, longest
history) are written into the served schema when a replica builds its app
(:func:`apply_limits`). Every non-2xx answer has one body shape, :class:`ErrorBody` - the
shape FastAPI uses for validation errors - whatever produced it.
"""

from __future__ import annotations

import copy
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator

from serving.config import ServingConfig


def _who_schema(schema: dict[str, Any]) -> None:
    # The "user_id or history" rule, for clients and fuzzers: a null counts as absent.
    schema["anyOf"] = [
        {"required": ["user_id"], "properties": {"user_id": {"type": "string"}}},
        {"required": ["history"], "properties": {"history": {"type": "array"}}},
    ]


def _integral(value: Any) -> Any:
    # JSON Schema's "integer" includes 10.0; strict mode still refuses "10", true and 10.5.
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


JsonInt = Annotated[int, BeforeValidator(_integral)]


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, json_schema_extra=_who_schema)

    @model_validator(mode="after")
    def _someone(self) -> _Request:
        if getattr(self, "user_id", None) is None and getattr(self, "history", None) is None:
            raise ValueError("send user_id, history, or both")
        return self


class RecommendRequest(_Request):
    user_id: str | None = Field(
        default=None, min_length=1, max_length=128, description="Whose recommendations."
    )
    history: list[str] | None = Field(
        default=None,
        description="Recent item ids, oldest first. Omitted: the user's live history is used.",
    )
    k: JsonInt = Field(default=10, ge=1, description="How many items to return.")
    exclude_seen: bool = Field(default=True, description="Leave out items in the history.")
    diversity: float = Field(default=0.0, ge=0.0, le=1.0, description="0 relevance .. 1 MMR.")


class ScoredItem(BaseModel):
    item_id: str
    score: float = Field(description="The score of the version that ranked this item.")
    version: int | None = Field(
        default=None,
        description="Interleaved answers only: the version that contributed this item; none "
        "where both versions picked it (its clicks credit neither).",
    )


class RecommendResponse(BaseModel):
    items: list[ScoredItem]
    version: int = Field(description="Registry version of the model that ranked these.")
    source: str = Field(description="'history' (model over the user's items) or 'popularity'.")
    history_len: int = Field(description="Known history items the model used.")
    unknown_items: int = Field(description="History items the model does not know (ignored).")
    trial: str | None = Field(
        default=None,
        description="Set when this answer interleaves two versions for a live trial: the "
        "trial's id (each item names the version that contributed it).",
    )


class ScoreRequest(_Request):
    user_id: str | None = Field(default=None, min_length=1, max_length=128)
    history: list[str] | None = Field(default=None)
    items: list[str] = Field(min_length=1, description="Items to score.")


class ScoreResponse(BaseModel):
    scores: dict[str, float | None] = Field(description="Score per item; null = unknown item.")
    version: int
    source: str


class ShardState(BaseModel):
    shard: int
    answering: bool = Field(description="False while it starts or rebuilds after a restart.")
    users: int | None = Field(default=None, description="Users whose live history it holds.")
    events_seen: int | None = Field(default=None, description="Events applied since its start.")
    rebuild_s: float | None = Field(default=None, description="Seconds its last rebuild took.")


class ModelsResponse(BaseModel):
    versions: list[int]
    champion: int | None
    serving: dict[str, int | None] = Field(description="Version each live replica serves now.")
    this_replica: int | None
    load_failures: dict[str, str]
    history_shards: list[ShardState] = Field(
        default_factory=list, description="The live-state shards (serving.history_shards)."
    )
    trial: str | None = Field(
        default=None, description="The live trial this replica interleaves answers for, if any."
    )

    @classmethod
    def of(
        cls, versions: list[int], champion: int | None, snap: dict[str, Any],
        this_replica: int | None, trial: str | None,
    ) -> ModelsResponse:  # fmt: skip
        """The answer from the registry's figures and a serving-context snapshot."""
        serving = {
            r: (int(d["version"]) if d.get("version") not in (None, "None") else None)
            for r, d in snap.get("replicas", {}).items()
        }
        return cls(
            versions=versions,
            champion=champion,
            serving=serving,
            this_replica=this_replica,
            load_failures=snap.get("load_failures", {}),
            history_shards=[
                ShardState(
                    answering=sh.get("answering", True),
                    **{k: sh[k] for k in ("shard", "users", "events_seen", "rebuild_s") if k in sh},
                )
                for sh in snap.get("shards", [])
            ],
            trial=trial,
        )


class HealthResponse(BaseModel):
    status: str = Field(description="'ok' once a model version is loaded.")
    version: int = Field(description="Version this replica serves.")


class ErrorItem(BaseModel):
    loc: list[str | int] = Field(description="Where the problem is, e.g. ['body', 'k'].")
    msg: str = Field(description="What is wrong, for people.")
    type: str = Field(description="What is wrong, for programs (e.g. 'too_large').")


class ErrorBody(BaseModel):
    """The body of every non-2xx answer."""

    detail: list[ErrorItem]


_WHY: dict[int, str] = {
    400: "The body could not be read as JSON text (e.g. it is not UTF-8).",
    401: "X-API-Key header missing or wrong.",
    413: "The body is larger than the configured limit, however it was sent.",
    422: "The request does not match the schema.",
    500: "The model produced unusable output (e.g. non-finite scores).",
    503: "No model version is loaded yet, or the service is overloaded.",
}


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """The ``responses=`` of a route: each status it can return, all with :class:`ErrorBody`."""
    return {s: {"model": ErrorBody, "description": _WHY[s]} for s in statuses}


# Paths that never ask for the API key: liveness and the contract itself.
PUBLIC_PATHS = frozenset({"/healthz", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"})


def apply_limits(schema: dict[str, Any], cfg: ServingConfig) -> dict[str, Any]:
    """A copy of ``schema`` with the settings' limits (and, when a key is set, the API-key rule)."""
    schema = copy.deepcopy(schema)
    comps = schema.get("components", {}).get("schemas", {})
    for name in ("RecommendRequest", "ScoreRequest"):
        props = comps.get(name, {}).get("properties", {})
        for branch in props.get("history", {}).get("anyOf", []):
            if branch.get("type") == "array":
                branch["maxItems"] = cfg.max_history
        if "items" in props:
            props["items"]["maxItems"] = cfg.max_history
        if "k" in props:
            props["k"]["maximum"] = cfg.max_k
    if cfg.api_key is not None:
        schema.setdefault("components", {})["securitySchemes"] = {
            "ApiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"}
        }
        unauthorized = {
            "description": _WHY[401],
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}},
        }
        for path, ops in schema.get("paths", {}).items():
            if path in PUBLIC_PATHS:
                continue
            for op in ops.values():
                op["security"] = [{"ApiKey": []}]
                op.setdefault("responses", {})["401"] = unauthorized
    return schema
