"""The wire formats ingest reads: JSON (streamtune's own events, or any shape through
``ingest.mapping``) and Avro in the Confluent wire format (``ingest.avro``).

An Avro record is decoded against its writer schema (``streams.avro``) into a plain object and
then takes the JSON path: re-encoded as one JSON line, it goes through ``codec.decode_batch``
with the same mapping, so what an Avro event may hold, and why one is refused, is exactly what
it is for JSON. (A JSON line per record costs a few microseconds; two contracts would cost more.)
Records refused by the Avro step keep its reasons (``avro-framing``, ``avro-unknown-schema``, ...).

A schema registry that does not answer is an outage, not bad input: the poll's decode waits and
retries (the consumer's records stay uncommitted meanwhile) until the registry is back or ingest
stops.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Sequence
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from streams.avro import AvroDecoder, split_reason
from streams.codec import Decoded, Record, decode_batch
from streams.config import IngestConfig
from streams.errors import SchemaRegistryUnavailableError
from streams.events import DecodeError

log = logging.getLogger(__name__)

RETRY_MAX_S = 30.0


class Decoder:
    """One ingest's decoder: ``decoder(values, records)`` -> ``Decoded``, whatever the format."""

    def __init__(self, cfg: IngestConfig, stop: threading.Event | None = None) -> None:
        self.cfg = cfg
        self.stop = stop or threading.Event()
        self.avro = AvroDecoder(cfg.avro) if cfg.format == "avro" and cfg.avro else None

    def __call__(self, values: Sequence[bytes | None], records: Sequence[Record]) -> Decoded:
        if self.avro is None:
            return decode_batch(values, self.cfg.mapping, records)
        return self._avro(values, records)

    def close(self) -> None:
        if self.avro is not None:
            self.avro.close()

    def _avro(self, values: Sequence[bytes | None], records: Sequence[Record]) -> Decoded:
        assert self.avro is not None
        objs, reasons = self._decode_values(values)
        lines: list[bytes | None] = []
        kept: list[int] = []
        errors: list[tuple[int, DecodeError]] = []
        for i, (obj, reason) in enumerate(zip(objs, reasons, strict=True)):
            if reason is not None or obj is None:
                errors.append((i, DecodeError(*split_reason(reason or "empty: no value"))))
                continue
            try:
                lines.append(_json_line(obj, native=self.cfg.mapping is None))
            except (TypeError, ValueError) as err:  # bytes/fixed fields have no JSON form
                errors.append((i, DecodeError("schema", f"not representable as JSON: {err}")))
                continue
            kept.append(i)
        origin = [records[i] for i in kept] if records else None
        inner = decode_batch(lines, self.cfg.mapping, origin)
        at = inner.table.schema.get_field_index("index")  # positions in lines -> in values
        table = inner.table.set_column(
            at, "index", pc.take(pa.array(kept, pa.int64()), inner.table["index"])
        )
        errors += [(kept[i], err) for i, err in inner.errors]
        return Decoded(table, sorted(errors, key=lambda e: e[0]), inner.one_by_one,
                       [kept[i] for i in inner.dropped])  # fmt: skip

    def _decode_values(
        self, values: Sequence[bytes | None]
    ) -> tuple[list[dict[str, Any] | None], list[str | None]]:
        assert self.avro is not None
        wait = 1.0
        while True:
            try:
                return self.avro.decode_values(values)
            except SchemaRegistryUnavailableError as err:
                if self.stop.is_set():
                    raise
                log.warning("schema registry unavailable (%s); retrying in %.0f s", err, wait)
                self.stop.wait(wait)
                wait = min(RETRY_MAX_S, wait * 2)


def _json_line(obj: dict[str, Any], native: bool) -> bytes:
    # Native-shaped Avro carries the contract's fields; its schema need not carry ``v``.
    body = {"v": 1, **obj} if native else obj
    return json.dumps(body, separators=(",", ":"), allow_nan=False).encode()
