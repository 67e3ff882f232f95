"""The behaviour-event contract (schema version 1) and its wire and columnar encodings.

Wire: one UTF-8 JSON object per Kafka record, keyed by ``user_id`` so that a user's events stay
ordered inside one partition. Columnar: the Arrow schema of the buffer's Parquet segments, which
adds where each event came from (topic, partition, offset).
"""

from __future__ import annotations

import json
import uuid
from enum import StrEnum
from typing import Any, Literal

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from streams.errors import StreamsError

SCHEMA_VERSION = 1


class EventType(StrEnum):
    VIEW = "view"
    CLICK = "click"
    CART = "cart"
    PURCHASE = "purchase"
    RATING = "rating"


class Event(BaseModel):
    """One user-behaviour event, as producers publish it."""

    model_config = ConfigDict(extra="forbid", frozen=True, str_strip_whitespace=True)

    v: Literal[1] = Field(default=1, description="Schema version of this record.")
    event_id: str = Field(
        min_length=1, max_length=128, description="Globally unique id; dedup key."
    )
    user_id: str = Field(min_length=1, max_length=128, description="Who acted; also the Kafka key.")
    item_id: str = Field(min_length=1, max_length=128, description="What they acted on.")
    event_type: EventType = Field(description="view, click, cart, purchase or rating.")
    value: float = Field(
        default=1.0, ge=-1e6, le=1e6, allow_inf_nan=False, description="Rating or weight."
    )
    ts: int = Field(ge=0, lt=2**53, description="Event time, epoch milliseconds.")
    item_text: str | None = Field(
        default=None, max_length=2048, description="Optional item title, for cold-start items."
    )
    context: dict[str, Any] | None = Field(
        default=None, description="Optional free-form context (device, page, ...)."
    )

    @field_validator("user_id", "item_id", mode="before")
    @classmethod
    def _ids_as_text(cls, value: Any) -> Any:
        # Datasets use integer ids; the contract keeps ids opaque strings.
        if isinstance(value, int) and not isinstance(value, bool):
            return str(value)
        return value

    def key(self) -> bytes:
        return self.user_id.encode()

    def encode(self) -> bytes:
        return self.model_dump_json(exclude_none=True).encode()

    def columns(self) -> dict[str, Any]:
        """This event's values in the buffer's columns (provenance apart)."""
        return {
            "event_id": self.event_id,
            "user_id": self.user_id,
            "item_id": self.item_id,
            "event_type": self.event_type.value,
            "value": self.value,
            "ts": self.ts,
            "item_text": self.item_text,
            "context": json.dumps(self.context) if self.context is not None else None,
        }


def new_event_id() -> str:
    return uuid.uuid4().hex


class DecodeError(StreamsError, ValueError):
    """A record that is not a valid event; ``reason`` is a short machine-friendly tag.

    Also a ValueError, as it was before the error root existed, so older callers still catch it.
    """

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def decode(raw: bytes | None) -> Event:
    """Parse one Kafka record value; raise DecodeError saying why it is not an event."""
    if raw is None:
        raise DecodeError("empty", "record has no value (tombstone)")
    try:
        return Event.model_validate_json(raw)
    except ValidationError as exc:
        # model_validate_json reports invalid JSON/UTF-8 as a 'json_invalid' error.
        kinds = {err["type"] for err in exc.errors()}
        if "json_invalid" in kinds or "json_type" in kinds:
            return _raise("undecodable", exc)
        return _raise("schema", exc)


def _raise(reason: str, exc: ValidationError) -> Event:
    detail = "; ".join(
        f"{'.'.join(str(p) for p in err['loc']) or '<root>'}: {err['msg']}"
        for err in exc.errors()[:5]
    )
    raise DecodeError(reason, detail) from None


# Columns of a buffer segment. Provenance columns make exactly-once checkable row by row.
ARROW_SCHEMA = pa.schema(
    [
        pa.field("event_id", pa.string(), nullable=False),
        pa.field("user_id", pa.string(), nullable=False),
        pa.field("item_id", pa.string(), nullable=False),
        pa.field("event_type", pa.string(), nullable=False),
        pa.field("value", pa.float64(), nullable=False),
        pa.field("ts", pa.int64(), nullable=False),
        pa.field("item_text", pa.string()),
        pa.field("context", pa.string()),
        pa.field("topic", pa.string(), nullable=False),
        pa.field("partition", pa.int32(), nullable=False),
        pa.field("offset", pa.int64(), nullable=False),
    ]
)


class RowBatch:
    """Column-wise accumulator for decoded events (cheaper than building dicts per row)."""

    __slots__ = ("columns",)

    def __init__(self) -> None:
        self.columns: dict[str, list[Any]] = {name: [] for name in ARROW_SCHEMA.names}

    def __len__(self) -> int:
        return len(self.columns["event_id"])

    def append(self, event: Event, topic: str, partition: int, offset: int) -> None:
        c = self.columns
        for name, val in event.columns().items():
            c[name].append(val)
        c["topic"].append(topic)
        c["partition"].append(partition)
        c["offset"].append(offset)

    def to_table(self) -> pa.Table:
        return pa.Table.from_pydict(self.columns, schema=ARROW_SCHEMA)
