"""Typed configuration of the Kafka side: client, topics, local broker, ingest, buffer."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, model_validator

from streams.avro import AvroConfig
from streams.config_base import StrictConfig
from streams.mapping import MappingConfig
from streams.storage import Location, StorageConfig

Protocol = Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"]
SaslMechanism = Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"]


class KafkaConfig(StrictConfig):
    """How to reach Kafka: the embedded local broker by default, or any existing cluster."""

    bootstrap_servers: str = Field(
        default="127.0.0.1:9092", description="Comma-separated host:port list of brokers."
    )
    security_protocol: Protocol = Field(default="PLAINTEXT", description="Kafka security protocol.")
    sasl_mechanism: SaslMechanism | None = Field(
        default=None, description="SASL mechanism, required with SASL_* protocols."
    )
    sasl_username: str | None = Field(default=None, description="SASL user name.")
    sasl_password: SecretStr | None = Field(default=None, description="SASL password.")
    ssl_cafile: Path | None = Field(default=None, description="CA bundle to verify brokers.")
    ssl_certfile: Path | None = Field(default=None, description="Client certificate (mTLS).")
    ssl_keyfile: Path | None = Field(default=None, description="Client private key (mTLS).")
    client_id: str = Field(default="streamtune", description="Client id reported to brokers.")

    @model_validator(mode="after")
    def _check_sasl(self) -> KafkaConfig:
        if self.security_protocol.startswith("SASL") and not (
            self.sasl_mechanism and self.sasl_username and self.sasl_password
        ):
            raise ValueError(
                f"security_protocol={self.security_protocol} needs sasl_mechanism, sasl_username "
                "and sasl_password; set them or use PLAINTEXT/SSL"
            )
        return self

    def client_kwargs(self) -> dict[str, Any]:
        """Keyword arguments shared by kafka-python's producer, consumer and admin client."""
        kw: dict[str, Any] = {
            "bootstrap_servers": self.bootstrap_servers.split(","),
            "security_protocol": self.security_protocol,
            "client_id": self.client_id,
        }
        if self.sasl_mechanism:
            kw["sasl_mechanism"] = self.sasl_mechanism
            kw["sasl_plain_username"] = self.sasl_username
            kw["sasl_plain_password"] = (
                self.sasl_password.get_secret_value() if self.sasl_password else None
            )
        for key, path in (
            ("ssl_cafile", self.ssl_cafile),
            ("ssl_certfile", self.ssl_certfile),
            ("ssl_keyfile", self.ssl_keyfile),
        ):
            if path is not None:
                kw[key] = str(path)
        return kw


class TopicsConfig(StrictConfig):
    """Topic names and layout."""

    events: str = Field(default="streamtune.events", description="Behaviour events topic.")
    dead_letter: str = Field(default="streamtune.events.dlq", description="Dead-letter topic.")
    partitions: int = Field(default=4, ge=1, le=1024, description="Partitions when we create it.")
    replication_factor: int = Field(default=1, ge=1, description="Replication when we create it.")
    create: bool = Field(
        default=True,
        description=(
            "Create missing topics at start-up. With false streamtune never creates or alters "
            "topics (clusters that forbid it by ACL): it checks they exist and says at start-up "
            "which one is missing."
        ),
    )


# Credentials end up inside the broker's JAAS line and kafka-storage's --add-scram argument,
# whose quoting neither tool documents fully; a plain alphabet keeps both unambiguous.
_CREDENTIAL = r"^[A-Za-z0-9._~@#%+-]+$"
_MECHANISMS: tuple[SaslMechanism, ...] = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")


class SaslUser(StrictConfig):
    """A user the embedded broker accepts on its SASL_SSL listener."""

    name: str = Field(pattern=_CREDENTIAL, description="User name (letters, digits, ._~@#%+-).")
    password: SecretStr = Field(
        description=(
            "Password (same alphabet as the name). PLAIN checks it against the broker's JAAS "
            "config; SCRAM stores its salted hash when the storage is formatted."
        )
    )

    @model_validator(mode="after")
    def _check_password(self) -> SaslUser:
        if not re.fullmatch(_CREDENTIAL, self.password.get_secret_value()):
            raise ValueError(
                f"the password of SASL user {self.name!r} may only use letters, digits and ._~@#%+-"
            )
        return self


class SaslSslListener(StrictConfig):
    """An extra SASL_SSL client listener on the embedded broker, beside its PLAINTEXT one."""

    port: int = Field(ge=1, le=65535, description="Port of the SASL_SSL listener.")
    keystore: Path = Field(
        description="PKCS12 keystore holding the broker's private key and certificate chain."
    )
    keystore_password: SecretStr = Field(description="Password of the keystore and of its key.")
    mechanisms: list[SaslMechanism] = Field(
        default_factory=lambda: list(_MECHANISMS),
        min_length=1,
        description="SASL mechanisms the listener enables.",
    )
    users: list[SaslUser] = Field(
        min_length=1,
        description=(
            "Accepted users. SCRAM credentials are created at storage format time, i.e. on the "
            "first `up` of a fresh state_dir; later changes need a new state_dir."
        ),
    )


class BrokerConfig(StrictConfig):
    """The embedded single-node Apache Kafka broker (KRaft) that the project starts itself."""

    host: str = Field(default="127.0.0.1", description="Listen address; loopback unless opened.")
    port: int = Field(default=9092, ge=1, le=65535, description="Client listener port.")
    controller_port: int = Field(default=9093, ge=1, le=65535, description="KRaft controller port.")
    state_dir: Path = Field(
        default=Path("state/kafka"), description="Log dirs, config, pid file and logs."
    )
    jar_cache: Path = Field(
        default=Path.home() / ".cache" / "streamtune" / "kafka",
        description="Where Maven-fetched broker jars are cached (outside the repo).",
    )
    heap: str = Field(default="768m", description="Broker JVM heap (-Xmx).")
    start_timeout_s: float = Field(default=90.0, gt=0, description="How long `up` waits.")
    sasl_ssl: SaslSslListener | None = Field(
        default=None,
        description=(
            "An extra SASL_SSL listener (TLS + SASL PLAIN/SCRAM) beside the PLAINTEXT one, which "
            "stays for local administration; None: PLAINTEXT only."
        ),
    )

    @model_validator(mode="after")
    def _check_ports(self) -> BrokerConfig:
        ports = [self.port, self.controller_port] + ([self.sasl_ssl.port] if self.sasl_ssl else [])
        if len(set(ports)) != len(ports):
            raise ValueError(f"broker listener ports must differ, got {ports}")
        return self

    @property
    def bootstrap(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def sasl_ssl_bootstrap(self) -> str | None:
        """host:port of the SASL_SSL listener, if there is one."""
        return f"{self.host}:{self.sasl_ssl.port}" if self.sasl_ssl else None


class BufferConfig(StrictConfig):
    """The durable Parquet event buffer."""

    path: Location = Field(
        default=Path("state/buffer"),
        description="Local directory or s3://, gs://, az:// URI under which segments are kept.",
    )
    storage: StorageConfig = Field(
        default_factory=StorageConfig, description="Object-store options when path is a URI."
    )
    compact_below_rows: int = Field(
        default=20_000, ge=1, description="Segments smaller than this are merged by compaction."
    )
    compact_target_rows: int = Field(
        default=200_000, ge=1, description="Compaction stops growing a merged segment here."
    )
    retention_hours: float | None = Field(
        default=None, gt=0, description="Drop segments whose newest event is older; None keeps all."
    )


class IngestConfig(StrictConfig):
    """The consumer-group ingest service."""

    format: Literal["json", "avro"] = Field(
        default="json",
        description=(
            "Record values: 'json' (one JSON object per record), or 'avro' (Confluent wire "
            "format: magic byte, schema id, Avro body; needs the `avro` section)."
        ),
    )
    avro: AvroConfig | None = Field(
        default=None,
        description="Where Avro writer schemas come from: a schema registry or a local .avsc.",
    )

    group_id: str = Field(default="streamtune-ingest", description="Kafka consumer group.")
    instance_id: str | None = Field(
        default=None,
        description=(
            "Static group membership id (one per ingest process, stable across restarts): a "
            "restarted member takes its partitions back at once instead of waiting for the "
            "session timeout and a rebalance."
        ),
    )
    session_timeout_ms: int = Field(
        default=10_000, ge=6_000, description="Consumer-group session timeout."
    )
    max_poll_records: int = Field(default=5000, ge=1, description="Records per poll.")
    segment_rows: int = Field(
        default=50_000, ge=1, description="Flush a segment once this many records are pending."
    )
    # A round can only start on what is flushed: this bounds the buffer's share of freshness.
    flush_interval_s: float = Field(
        default=0.2, gt=0, description="Flush at least this often while records are pending."
    )
    max_event_bytes: int = Field(
        default=64 * 1024, ge=256, description="Larger records are dead-lettered as oversized."
    )
    idle_exit_s: float | None = Field(
        default=None, gt=0, description="Exit after this long with nothing new (batch mode)."
    )
    dead_letter_timeout_s: float = Field(
        default=10.0,
        gt=0,
        description=(
            "How long a flush waits for the dead-letter topic to acknowledge its records; past "
            "it the flush fails and the records are re-read, never dropped."
        ),
    )
    retry_initial_s: float = Field(
        default=0.5, gt=0, description="First wait after a failed flush (DLQ down, disk full)."
    )
    retry_max_s: float = Field(
        default=30.0, gt=0, description="Longest wait between retries; the wait doubles up to it."
    )
    reconnect_backoff_max_s: float = Field(
        default=2.0,
        gt=0,
        description=(
            "Longest wait between reconnects to a broker that went away; kafka-python's 30 s "
            "default would leave ingest idle that long after the broker is back."
        ),
    )
    mapping: MappingConfig | None = Field(
        default=None,
        description=(
            "How to read events in your own JSON shape (field paths, event-type names, timestamp "
            "format, ids); unset: records are streamtune's native event JSON. With "
            "format='avro', the paths point into the decoded Avro record."
        ),
    )

    @model_validator(mode="after")
    def _check_format(self) -> IngestConfig:
        if self.format == "avro" and self.avro is None:
            raise ValueError(
                "ingest.format='avro' needs ingest.avro: set avro.registry_url (a Confluent-"
                "compatible schema registry) or avro.schema_file (a local .avsc)"
            )
        if self.format == "json" and self.avro is not None:
            raise ValueError("ingest.avro is set but ingest.format='json': set format='avro'")
        return self
