"""Avro record values in the Confluent wire format, decoded with fastavro.

Wire format (Confluent Schema Registry serializers, and Apicurio's in compatibility mode)::

    byte 0      magic byte, always 0
    bytes 1-4   schema id, big-endian unsigned int
    bytes 5-    the Avro binary encoding of one datum, written with that schema

The writer schema comes from a Confluent-compatible registry (``GET {registry_url}/schemas/ids/
{id}``), parsed once per id and kept in a bounded LRU cache; or, for teams without a registry,
from a local ``.avsc`` file. An optional reader schema resolves every writer schema onto one shape
(Avro schema evolution: fields a writer lacks take the reader's defaults).

What is dead-lettered and what is not: a record is dead-lettered when the record itself is at
fault: no magic byte or too short (``avro-framing``), a schema id the registry does not know
(``avro-unknown-schema``), a body that does not decode against its schema or leaves bytes over
(``avro-undecodable``), a schema that is not a usable Avro record schema (``avro-unsupported-
schema``), a tombstone (``empty``, as for JSON). A registry that does not answer (connection
refused, timeout, 5xx, 429) says nothing about the records: ``SchemaRegistryUnavailableError`` is
raised so that ingest stops short of committing and retries the same offsets later; dead-lettering
there would send every record of an outage to the dead-letter topic. A registry that answers in a
way that means streamtune is misconfigured (401/403, a 404 that is not the API's "schema not
found") raises ``SchemaRegistryError`` naming ``avro.registry_url``.

Logical types are not converted unless ``logical_types`` is set: a ``timestamp-millis`` field is
the epoch-ms long it is on the wire, which the input mapping reads with ``ts_format: epoch_ms``.
"""

from __future__ import annotations

import io
import json
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from fastavro import parse_schema, schemaless_reader, schemaless_writer
from pydantic import BaseModel, ConfigDict, Field, model_validator

from streams.errors import SchemaRegistryError, SchemaRegistryUnavailableError

MAGIC = 0
HEADER = 5  # magic byte + 4-byte schema id

# Dead-letter reason tags; a reason string is "<tag>: <detail>" (see ``split_reason``).
EMPTY = "empty"
FRAMING = "avro-framing"
UNKNOWN_SCHEMA = "avro-unknown-schema"
UNDECODABLE = "avro-undecodable"
UNSUPPORTED_SCHEMA = "avro-unsupported-schema"

# The Confluent API's error code for "schema not found" (Apicurio's ccompat API uses it too).
_SCHEMA_NOT_FOUND = 40403

Schema = dict[str, Any]


class AvroConfig(BaseModel):
    """Where Avro writer schemas come from: a schema registry, or one local ``.avsc`` file."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    registry_url: str | None = Field(
        default=None,
        description=(
            "Root of a Confluent-compatible schema registry API; schemas are fetched with GET "
            "{registry_url}/schemas/ids/{id}. Confluent: http://host:8081; Apicurio: "
            "http://host:8080/apis/ccompat/v7. Exactly one of registry_url and schema_file."
        ),
    )
    schema_file: Path | None = Field(
        default=None,
        description=(
            "A local .avsc writer schema, for producers without a registry: every record is "
            "decoded with it. Exactly one of registry_url and schema_file."
        ),
    )
    schema_id: int | None = Field(
        default=None,
        ge=0,
        lt=2**32,
        description=(
            "With schema_file only: the id records must carry (others are dead-lettered as "
            "unknown schema); None accepts any id, as the producers' ids may be meaningless here."
        ),
    )
    reader_schema_file: Path | None = Field(
        default=None,
        description=(
            "Optional .avsc reader schema: every record is resolved onto it (fields its writer "
            "lacks get the reader's defaults), so schema evolution yields one shape."
        ),
    )
    logical_types: bool = Field(
        default=False,
        description=(
            "Convert Avro logical types as fastavro does (datetime, date, Decimal, UUID). Off: "
            "values stay their underlying Avro type, so a timestamp-millis field is an epoch-ms "
            "integer (ingest.mapping ts_format epoch_ms; timestamp-micros: epoch_us) and every "
            "value but bytes/fixed/decimal is plain JSON."
        ),
    )
    cache_size: int = Field(
        default=1000, ge=1, description="Parsed registry schemas kept (LRU), by schema id."
    )
    request_timeout_s: float = Field(
        default=5.0, gt=0, description="Timeout of one registry request (connect and read)."
    )

    @model_validator(mode="after")
    def _one_source(self) -> AvroConfig:
        if (self.registry_url is None) == (self.schema_file is None):
            raise ValueError("avro: set exactly one of registry_url and schema_file")
        if self.schema_id is not None and self.schema_file is None:
            raise ValueError("avro.schema_id applies only with avro.schema_file")
        if self.registry_url is not None and not self.registry_url.startswith(
            ("http://", "https://")
        ):
            raise ValueError(f"avro.registry_url must be an http(s) URL, got {self.registry_url!r}")
        for name in ("schema_file", "reader_schema_file"):
            path = getattr(self, name)
            if path is not None:
                _record_schema(_load_avsc(path, f"avro.{name}"), f"avro.{name}", True)
        return self


@dataclass
class AvroStats:
    """Schema lookups by record: answered from the cache, or by a registry request."""

    cache_hits: int = 0
    registry_fetches: int = 0


@dataclass(frozen=True)
class _Writer:
    schema: Schema | None  # None: not usable, ``problem`` says why
    problem: str | None = None


def split_reason(reason: str) -> tuple[str, str]:
    """A dead-letter reason string as (tag, detail), the pair ingest's dead-letter headers take."""
    tag, _, detail = reason.partition(": ")
    return tag, detail


class AvroDecoder:
    """Decodes the values of one poll into Python dicts, or a dead-letter reason per record."""

    def __init__(self, cfg: AvroConfig, client: httpx.Client | None = None) -> None:
        self.cfg = cfg
        self.stats = AvroStats()
        self._cache: OrderedDict[int, _Writer] = OrderedDict()
        self._client = client
        self._own_client = client is None
        self._reader: Schema | None = None
        if cfg.reader_schema_file is not None:
            self._reader = _record_schema(
                _load_avsc(cfg.reader_schema_file, "avro.reader_schema_file"),
                "avro.reader_schema_file",
                cfg.logical_types,
            )
        self._file_writer: _Writer | None = None
        if cfg.schema_file is not None:
            self._file_writer = _Writer(
                _record_schema(
                    _load_avsc(cfg.schema_file, "avro.schema_file"),
                    "avro.schema_file",
                    cfg.logical_types,
                )
            )

    # -- decoding ------------------------------------------------------------------------
    def decode_values(
        self, values: Sequence[bytes | None]
    ) -> tuple[list[dict[str, Any] | None], list[str | None]]:
        """Per record, the decoded object or the dead-letter reason ("<tag>: <detail>").

        Exactly one of the two lists holds a value at each position. Raises
        ``SchemaRegistryUnavailableError`` (nothing is returned) if a schema must be fetched and
        the registry does not answer: the caller retries the whole poll later.
        """
        objs: list[dict[str, Any] | None] = []
        reasons: list[str | None] = []
        # Ids the registry said it does not know, asked once per call: a burst of records with a
        # bad id costs one request, and an id registered later is found on a later poll.
        unknown: dict[int, str] = {}
        for raw in values:
            obj, reason = self._decode_one(raw, unknown)
            objs.append(obj)
            reasons.append(reason)
        return objs, reasons

    def _decode_one(
        self, raw: bytes | None, unknown: dict[int, str]
    ) -> tuple[dict[str, Any] | None, str | None]:
        if raw is None:
            return None, f"{EMPTY}: record has no value (tombstone)"
        if len(raw) < HEADER:
            return None, (
                f"{FRAMING}: {len(raw)} bytes, shorter than the 5-byte header "
                "(magic byte 0 + 4-byte schema id)"
            )
        if raw[0] != MAGIC:
            return None, f"{FRAMING}: first byte is 0x{raw[0]:02x}, not the magic byte 0x00"
        schema_id = int.from_bytes(raw[1:HEADER], "big")
        if schema_id in unknown:
            return None, unknown[schema_id]
        writer = self._writer(schema_id, unknown)
        if writer is None:
            return None, unknown[schema_id]
        if writer.schema is None:
            return None, f"{UNSUPPORTED_SCHEMA}: schema id {schema_id}: {writer.problem}"
        fo = io.BytesIO(raw)
        fo.seek(HEADER)
        try:
            obj = schemaless_reader(fo, writer.schema, self._reader)
        except Exception as exc:  # fastavro's reader raises assorted built-ins on bad input
            return None, (
                f"{UNDECODABLE}: body does not decode with schema id {schema_id}: "
                f"{type(exc).__name__}: {exc}"
            )
        left = len(raw) - fo.tell()
        if left:
            return None, (
                f"{UNDECODABLE}: {left} bytes left over after the datum of schema id {schema_id}"
            )
        assert isinstance(obj, dict)  # both schemas are checked to be records
        return obj, None

    # -- schemas -------------------------------------------------------------------------
    def _writer(self, schema_id: int, unknown: dict[int, str]) -> _Writer | None:
        if self._file_writer is not None:
            if self.cfg.schema_id is not None and schema_id != self.cfg.schema_id:
                unknown[schema_id] = (
                    f"{UNKNOWN_SCHEMA}: schema id {schema_id} is not avro.schema_id "
                    f"{self.cfg.schema_id} of the local schema file"
                )
                return None
            self.stats.cache_hits += 1
            return self._file_writer
        cached = self._cache.get(schema_id)
        if cached is not None:
            self._cache.move_to_end(schema_id)
            self.stats.cache_hits += 1
            return cached
        writer = self._fetch(schema_id)
        if writer is None:
            unknown[schema_id] = (
                f"{UNKNOWN_SCHEMA}: the schema registry has no schema id {schema_id}"
            )
            return None
        self._cache[schema_id] = writer
        if len(self._cache) > self.cfg.cache_size:
            self._cache.popitem(last=False)
        return writer

    def _fetch(self, schema_id: int) -> _Writer | None:
        """The registry's schema for ``schema_id``; None if it has none."""
        assert self.cfg.registry_url is not None
        url = f"{self.cfg.registry_url.rstrip('/')}/schemas/ids/{schema_id}"
        self.stats.registry_fetches += 1
        try:
            resp = self._http().get(url, headers={"Accept": "application/json"})
        except httpx.TransportError as exc:  # refused, reset, timed out, DNS
            raise SchemaRegistryUnavailableError(
                f"schema registry {self.cfg.registry_url} did not answer for schema id "
                f"{schema_id}: {type(exc).__name__}: {exc}"
            ) from exc
        if resp.status_code >= 500 or resp.status_code == 429:
            raise SchemaRegistryUnavailableError(
                f"schema registry {self.cfg.registry_url} answered {resp.status_code} for schema "
                f"id {schema_id}: {resp.text[:300]}"
            )
        if resp.status_code == 404 and _error_code(resp) == _SCHEMA_NOT_FOUND:
            return None
        if resp.status_code != 200:
            raise SchemaRegistryError(
                f"GET {url} answered {resp.status_code} ({resp.text[:300]}); check "
                "avro.registry_url (the root of a Confluent-compatible API, e.g. "
                "http://host:8081, or http://host:8080/apis/ccompat/v7 for Apicurio) and its "
                "credentials"
            )
        try:
            body = resp.json()
            text = body["schema"]
        except (ValueError, KeyError, TypeError) as exc:
            raise SchemaRegistryError(
                f"GET {url} did not return a Confluent schema object; check avro.registry_url"
            ) from exc
        kind = body.get("schemaType", "AVRO")
        if kind != "AVRO":
            return _Writer(None, f"a {kind} schema, not Avro")
        if body.get("references"):
            return _Writer(None, "it has schema references, which streamtune does not resolve")
        try:
            schema = _record_schema(
                json.loads(text), "the registry's schema", self.cfg.logical_types
            )
            return _Writer(schema)
        except ValueError as exc:
            return _Writer(None, str(exc))

    def _http(self) -> httpx.Client:
        if self._client is None:
            self._client = httpx.Client(timeout=self.cfg.request_timeout_s)
        return self._client

    def close(self) -> None:
        if self._client is not None and self._own_client:
            self._client.close()
            self._client = None

    def __enter__(self) -> AvroDecoder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- producing side: tests, the benchmark and the demo publish Avro this way ----------------
def frame(schema_id: int, schema: Schema, record: dict[str, Any]) -> bytes:
    """One record value in the Confluent wire format (``schema`` as parsed by ``parse``)."""
    buf = io.BytesIO()
    buf.write(bytes([MAGIC]))
    buf.write(schema_id.to_bytes(4, "big"))
    schemaless_writer(buf, schema, record)
    return buf.getvalue()


def parse(schema: dict[str, Any]) -> Schema:
    """A parsed record schema, for ``frame`` (ValueError if it is not a valid record schema)."""
    return _record_schema(schema, "the schema", logical_types=True)


def register_schema(
    registry_url: str, subject: str, schema: dict[str, Any], timeout_s: float = 5.0
) -> int:
    """Register ``schema`` under ``subject`` (Confluent API); returns its schema id."""
    resp = httpx.post(
        f"{registry_url.rstrip('/')}/subjects/{subject}/versions",
        json={"schema": json.dumps(schema), "schemaType": "AVRO"},
        headers={"Content-Type": "application/vnd.schemaregistry.v1+json"},
        timeout=timeout_s,
    )
    if resp.status_code != 200:
        raise SchemaRegistryError(
            f"registering subject {subject!r} answered {resp.status_code}: {resp.text[:300]}"
        )
    return int(resp.json()["id"])


def _load_avsc(path: Path, setting: str) -> Any:
    try:
        return json.loads(path.read_text())
    except OSError as exc:
        raise ValueError(f"{setting}: cannot read {path}: {exc}") from exc
    except ValueError as exc:
        raise ValueError(f"{setting}: {path} is not JSON: {exc}") from exc


def _record_schema(raw: Any, where: str, logical_types: bool) -> Schema:
    """Parse an Avro schema that must be a record (an event is an object, not a scalar).

    Each schema gets its own name space, so two schema ids never share named types. Without
    ``logical_types`` the annotations are removed before parsing: fastavro converts by them.
    """
    try:
        parsed = parse_schema(raw if logical_types else _plain(raw), named_schemas={})
    except Exception as exc:  # fastavro reports bad schemas with several exception types
        raise ValueError(f"{where} is not a valid Avro schema: {exc}") from exc
    if not isinstance(parsed, dict) or parsed.get("type") != "record":
        raise ValueError(f"{where} must be an Avro record schema, not {json.dumps(raw)[:80]}")
    return parsed


def _plain(schema: Any) -> Any:
    """``schema`` without logicalType annotations (default values are data, left as they are)."""
    if isinstance(schema, dict):
        return {
            k: (v if k == "default" else _plain(v)) for k, v in schema.items() if k != "logicalType"
        }
    if isinstance(schema, list):
        return [_plain(v) for v in schema]
    return schema


def _error_code(resp: httpx.Response) -> int | None:
    try:
        code = resp.json().get("error_code")
    except (ValueError, AttributeError):
        return None
    return code if isinstance(code, int) else None
