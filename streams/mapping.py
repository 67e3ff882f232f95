"""Input mapping: events in a user's own JSON shape, read into the native event contract.

A typed ``ingest.mapping`` section names, by dotted path into each record's JSON object, where
the user, item, event type, value, timestamp, event id, item text and context are; how the user's
event-type names map to ours; the timestamp's format; and whether the user comes from a field or
the Kafka message key, and the event id from a field or from the record's topic/partition/offset.

``map_record`` is the contract of a mapped record, one at a time: it builds the native event's
JSON and hands it to ``events.decode``, so a mapped record is refused for the same reasons, in the
same words, as a native one. ``codec.decode_batch`` has a column-wise fast path for the common
case that decides as ``map_record`` does.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import re
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from streams.events import DecodeError, Event, EventType, decode

UNMAPPED = "unmapped_event_type"  # the dead-letter reason of an event type not in the mapping

_PATH = re.compile(r"^[^.]+(\.[^.]+)*$")
_OURS = ", ".join(t.value for t in EventType)


class MappingConfig(BaseModel):
    """Where each field of the event contract is in the user's JSON records."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    user: str | None = Field(
        default=None,
        description=(
            "Dotted path of the user id, e.g. 'user.id'. Leave unset with user_from='key'. "
            "Numbers are taken as text, as in the native contract."
        ),
    )
    user_from: Literal["field", "key"] = Field(
        default="field",
        description="'field': the user is at `user`; 'key': the Kafka message key (UTF-8) is.",
    )
    item: str = Field(description="Dotted path of the item id, e.g. 'product.sku'.")
    event_type: str = Field(description="Dotted path of the event-type name, e.g. 'action'.")
    event_types: dict[str, str] = Field(
        description=(
            "Your event-type names to ours (view, click, cart, purchase, rating), e.g. "
            "{'add_to_cart': 'cart', 'order': 'purchase'}. Names are matched exactly."
        ),
    )
    unmapped_types: Literal["dead_letter", "drop"] = Field(
        default="dead_letter",
        description=(
            f"A record whose event type is not in event_types: 'dead_letter' (reason "
            f"'{UNMAPPED}') or 'drop' (consumed, not stored, not dead-lettered)."
        ),
    )
    value: str | None = Field(
        default=None,
        description="Dotted path of the rating or weight; where unset, absent or null: 1.0.",
    )
    ts: str = Field(description="Dotted path of the event time, e.g. 'occurred_at'.")
    ts_format: Literal["epoch_s", "epoch_ms", "epoch_us", "iso8601"] = Field(
        default="epoch_ms",
        description=(
            "epoch_s / epoch_ms / epoch_us: a JSON number of seconds, milliseconds or "
            "microseconds since 1970 (fractions rounded to the millisecond); iso8601: a string "
            "with a zone, e.g. '2026-01-31T12:00:00.250+01:00' or '...Z' (no zone: refused)."
        ),
    )
    event_id: str | None = Field(
        default=None,
        description="Dotted path of a unique event id; leave unset with event_id_from='derived'.",
    )
    event_id_from: Literal["field", "derived"] = Field(
        default="derived",
        description=(
            "'field': the id is at `event_id`; 'derived': '<topic>:<partition>:<offset>' of the "
            "record (deterministic, so a re-read record gets the same id)."
        ),
    )
    item_text: str | None = Field(
        default=None, description="Dotted path of an optional item title (absent or null: none)."
    )
    context: str | None = Field(
        default=None,
        description="Dotted path of an optional JSON object of context (absent or null: none).",
    )

    @field_validator("user", "item", "event_type", "value", "ts", "event_id", "item_text",
                     "context")  # fmt: skip
    @classmethod
    def _dotted(cls, path: str | None) -> str | None:
        if path is not None and not _PATH.match(path):
            raise ValueError(
                f"{path!r} is not a dotted path: give field names joined by '.', "
                "none of them empty, e.g. 'product.sku'"
            )
        return path

    @field_validator("event_types")
    @classmethod
    def _ours(cls, types: dict[str, str]) -> dict[str, str]:
        if not types:
            raise ValueError(
                "is empty: map each of your event-type names to one of ours "
                f"({_OURS}), e.g. {{'add_to_cart': 'cart'}}"
            )
        for theirs, ours in types.items():
            if ours not in EventType._value2member_map_:
                raise ValueError(
                    f"{theirs!r} maps to {ours!r}, which is not one of ours: use one of {_OURS}"
                )
        return types

    @model_validator(mode="after")
    def _consistent(self) -> MappingConfig:
        if self.user_from == "field" and self.user is None:
            raise ValueError("user_from='field' needs `user`, the path of the user id")
        if self.user_from == "key" and self.user is not None:
            raise ValueError(
                f"user={self.user!r} is set but user_from='key' takes the message key: "
                "unset one of them"
            )
        if self.event_id_from == "field" and self.event_id is None:
            raise ValueError("event_id_from='field' needs `event_id`, the path of the event id")
        if self.event_id_from == "derived" and self.event_id is not None:
            raise ValueError(
                f"event_id={self.event_id!r} is set but event_id_from='derived': set "
                "event_id_from='field' to read it, or unset event_id"
            )
        columns = self.columns()
        paths = sorted(columns)
        for a, b in itertools.pairwise(paths):
            if b.startswith(a + "."):
                raise ValueError(
                    f"paths overlap: {a!r} ({', '.join(columns[a][0])}) holds {b!r} "
                    f"({', '.join(columns[b][0])}); a field cannot be both a value and an object"
                )
        for path, (roles, types) in columns.items():
            if len(set(types)) > 1:
                raise ValueError(
                    f"{path!r} is read as both {' and '.join(roles)}, which need different JSON "
                    "types: point them at different fields"
                )
        return self

    def roles(self) -> dict[str, str]:
        """Contract field -> dotted path, for the fields read from the record."""
        named = {
            "user_id": self.user,
            "item_id": self.item,
            "event_type": self.event_type,
            "value": self.value,
            "ts": self.ts,
            "event_id": self.event_id,
            "item_text": self.item_text,
            "context": self.context,
        }
        return {role: path for role, path in named.items() if path is not None}

    def arrow_type(self, role: str) -> pa.DataType:
        """The JSON type a role's field must have for the batch reader."""
        if role == "value":
            return pa.float64()
        if role == "ts":
            return {
                "epoch_s": pa.float64(),
                "epoch_ms": pa.int64(),
                "epoch_us": pa.int64(),
                "iso8601": pa.string(),
            }[self.ts_format]
        if role == "context":
            return pa.struct([])  # an object; its members are read one by one (see codec)
        return pa.string()

    def columns(self) -> dict[str, tuple[list[str], list[pa.DataType]]]:
        """Dotted path -> (roles read from it, their types)."""
        out: dict[str, tuple[list[str], list[pa.DataType]]] = {}
        for role, path in self.roles().items():
            roles, types = out.setdefault(path, ([], []))
            roles.append(role)
            types.append(self.arrow_type(role))
        return out

    def wire_schema(self) -> pa.Schema:
        """The nested Arrow schema the batch reader parses records against."""
        tree: dict[str, Any] = {}
        for path, (_, types) in self.columns().items():
            *parents, leaf = path.split(".")
            node = tree
            for p in parents:
                node = node.setdefault(p, {})
            node[leaf] = types[0]

        def build(node: dict[str, Any]) -> list[pa.Field]:
            return [
                pa.field(k, pa.struct(build(v)) if isinstance(v, dict) else v)
                for k, v in node.items()
            ]

        return pa.schema(build(tree))


def derived_id_prefix(topic: str, partition: int) -> str:
    """'<topic>:<partition>:' of a derived event id; a long topic name is hashed to keep the id
    within the contract's 128 characters (Kafka allows 249-character names)."""
    name = (
        topic if len(topic) <= 80 else hashlib.blake2b(topic.encode(), digest_size=16).hexdigest()
    )
    return f"{name}:{partition}:"


def derived_event_id(topic: str, partition: int, offset: int) -> str:
    return f"{derived_id_prefix(topic, partition)}{offset}"


_MISSING = object()


def lookup(obj: dict[str, Any], path: str) -> Any:
    """The value at a dotted path, or ``_MISSING`` when any step is absent or not an object."""
    node: Any = obj
    for name in path.split("."):
        if not isinstance(node, dict) or name not in node:
            return _MISSING
        node = node[name]
    return node


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MS = timedelta(milliseconds=1)


def epoch_ms(raw: Any, fmt: str) -> int:
    """A timestamp in ``fmt`` as epoch milliseconds; DecodeError('schema') if it is not one."""
    if fmt == "iso8601":
        if not isinstance(raw, str):
            raise DecodeError("schema", f"ts: expected an ISO-8601 string, got {raw!r}"[:300])
        try:
            dt = datetime.fromisoformat(raw)
        except ValueError:
            raise DecodeError("schema", f"ts: not an ISO-8601 timestamp: {raw!r}"[:300]) from None
        if dt.tzinfo is None:
            raise DecodeError(
                "schema", f"ts: ISO-8601 timestamp without a zone (add Z or +hh:mm): {raw!r}"[:300]
            )
        return (dt - _EPOCH) // _MS
    if isinstance(raw, bool) or not isinstance(raw, int | float):
        raise DecodeError("schema", f"ts: expected a number ({fmt}), got {raw!r}"[:300])
    if isinstance(raw, int):
        return {"epoch_s": raw * 1000, "epoch_ms": raw}.get(fmt, raw // 1000)
    # Fractions round half to even, as Arrow's round does on the batch path.
    scaled = {"epoch_s": raw * 1000.0, "epoch_ms": raw}.get(fmt, raw / 1000.0)
    if not math.isfinite(scaled):
        raise DecodeError("schema", f"ts: not a finite number of milliseconds: {raw!r}")
    return round(scaled)


def map_record(
    cfg: MappingConfig, raw: bytes | None, key: bytes | None, topic: str, partition: int,
    offset: int,
) -> Event | None:  # fmt: skip
    """One record by the mapping: its Event, None when its type is unmapped and dropped, or
    DecodeError saying why it is refused."""
    if raw is None:
        raise DecodeError("empty", "record has no value (tombstone)")
    try:
        obj = json.loads(raw.decode("utf-8"), strict=False)
    except (UnicodeDecodeError, ValueError) as err:
        raise DecodeError("undecodable", str(err)[:300]) from None
    if not isinstance(obj, dict):
        raise DecodeError("schema", f"<root>: expected a JSON object, got {type(obj).__name__}")
    kind = lookup(obj, cfg.event_type)
    native: dict[str, Any] = {"v": 1}
    if isinstance(kind, str):
        ours = cfg.event_types.get(kind)
        if ours is None:
            if cfg.unmapped_types == "drop":
                return None
            raise DecodeError(UNMAPPED, unmapped_detail(kind))
        native["event_type"] = ours
    elif kind is not _MISSING:
        native["event_type"] = kind  # not a name: decode() says what is wrong with it
    if cfg.event_id_from == "derived":
        native["event_id"] = derived_event_id(topic, partition, offset)
    if cfg.user_from == "key" and key is not None:
        try:
            native["user_id"] = key.decode("utf-8")
        except UnicodeDecodeError:
            raise DecodeError("schema", "user_id: the message key is not UTF-8") from None
    for role, path in cfg.roles().items():
        if role == "event_type":
            continue
        found = lookup(obj, path)
        if found is _MISSING or (found is None and role in ("value", "item_text", "context")):
            continue  # optional fields: absent or null both mean the default
        native[role] = epoch_ms(found, cfg.ts_format) if role == "ts" else found
    try:
        body = json.dumps(native)
    except ValueError as err:  # e.g. an integer too long to print
        raise DecodeError("schema", str(err)[:300]) from None
    return decode(body.encode())


def unmapped_detail(kind: str) -> str:
    return f"event type {kind!r} is not in ingest.mapping.event_types"[:300]
