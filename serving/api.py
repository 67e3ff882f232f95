"""The HTTP contract: request and response models (they are the OpenAPI schema)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class RecommendRequest(_Request):
    user_id: str | None = Field(
        default=None, min_length=1, max_length=128, description="Whose recommendations."
    )
    history: list[str] | None = Field(
        default=None,
        description="Recent item ids, oldest first. Omitted: the user's live history is used.",
    )
    k: int = Field(default=10, ge=1, description="How many items to return.")
    exclude_seen: bool = Field(default=True, description="Leave out items in the history.")
    diversity: float = Field(default=0.0, ge=0.0, le=1.0, description="0 relevance .. 1 MMR.")

    @model_validator(mode="after")
    def _someone(self) -> RecommendRequest:
        if self.user_id is None and self.history is None:
            raise ValueError("send user_id, history, or both")
        return self


class ScoredItem(BaseModel):
    item_id: str
    score: float


class RecommendResponse(BaseModel):
    items: list[ScoredItem]
    version: int = Field(description="Registry version of the model that ranked these.")
    source: str = Field(description="'history' (model over the user's items) or 'popularity'.")
    history_len: int = Field(description="Known history items the model used.")
    unknown_items: int = Field(description="History items the model does not know (ignored).")


class ScoreRequest(_Request):
    user_id: str | None = Field(default=None, min_length=1, max_length=128)
    history: list[str] | None = Field(default=None)
    items: list[str] = Field(min_length=1, description="Items to score.")

    @model_validator(mode="after")
    def _someone(self) -> ScoreRequest:
        if self.user_id is None and self.history is None:
            raise ValueError("send user_id, history, or both")
        return self


class ScoreResponse(BaseModel):
    scores: dict[str, float | None] = Field(description="Score per item; null = unknown item.")
    version: int
    source: str


class ModelsResponse(BaseModel):
    versions: list[int]
    champion: int | None
    serving: dict[str, int | None] = Field(description="Version each live replica serves now.")
    this_replica: int | None
    load_failures: dict[str, str]
