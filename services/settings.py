"""One settings object for the whole system: defaults, then a YAML/TOML file, then environment.

Environment overrides use the ``STREAMTUNE_`` prefix and ``__`` for nesting, e.g.
``STREAMTUNE_KAFKA__BOOTSTRAP_SERVERS=broker1:9092``. With no file and no environment the defaults
run everything on one machine: the embedded broker on 127.0.0.1 and state under ./state.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from services.config import LoopConfig, SupervisorConfig
from serving.config import RolloutConfig, ServingConfig
from streams.config import BrokerConfig, BufferConfig, IngestConfig, KafkaConfig, TopicsConfig
from training.config import (
    GateConfig,
    ModelConfig,
    RegistryConfig,
    ReplayConfig,
    TrainerConfig,
    TuneConfig,
)
from training.registry import Registry


class Settings(BaseSettings):
    """Every component's config, one field per component."""

    model_config = SettingsConfigDict(
        env_prefix="STREAMTUNE_", env_nested_delimiter="__", extra="forbid"
    )

    state_dir: Path = Field(default=Path("state"), description="Root of all local state.")
    embedded_broker: bool = Field(
        default=True,
        description="Start the local Kafka broker; set false to use kafka.bootstrap_servers only.",
    )
    kafka: KafkaConfig = Field(default_factory=KafkaConfig, description="Kafka connection.")
    topics: TopicsConfig = Field(default_factory=TopicsConfig, description="Topic names/layout.")
    broker: BrokerConfig = Field(default_factory=BrokerConfig, description="Embedded broker.")
    buffer: BufferConfig = Field(default_factory=BufferConfig, description="Event buffer.")
    ingest: IngestConfig = Field(default_factory=IngestConfig, description="Ingest service.")
    model: ModelConfig = Field(default_factory=ModelConfig, description="Recommender model.")
    trainer: TrainerConfig = Field(default_factory=TrainerConfig, description="Training rounds.")
    replay: ReplayConfig = Field(default_factory=ReplayConfig, description="Replay and KD.")
    gate: GateConfig = Field(default_factory=GateConfig, description="Promotion gate.")
    tune: TuneConfig = Field(default_factory=TuneConfig, description="First-version search.")
    registry: RegistryConfig = Field(
        default_factory=RegistryConfig, description="Model registry location."
    )
    loop: LoopConfig = Field(default_factory=LoopConfig, description="The continual loop.")
    supervisor: SupervisorConfig = Field(
        default_factory=SupervisorConfig, description="Restarts of `up`'s components."
    )
    serving: ServingConfig = Field(default_factory=ServingConfig, description="Ray Serve app.")
    rollout: RolloutConfig = Field(default_factory=RolloutConfig, description="Rollouts.")

    @property
    def registry_path(self) -> Path | str:
        return self.registry.path

    def open_registry(self) -> Registry:
        """The registry these settings name: the one way every command and service opens it."""
        return Registry(self.registry.path, keep=self.gate.keep_versions,
                        storage=self.registry.storage)  # fmt: skip

    @model_validator(mode="after")
    def _derive(self) -> Settings:
        # Sub-paths follow state_dir unless set explicitly.
        fields = self.model_fields_set
        if "broker" not in fields or "state_dir" not in self.broker.model_fields_set:
            self.broker.state_dir = self.state_dir / "kafka"
        if "buffer" not in fields or "path" not in self.buffer.model_fields_set:
            self.buffer.path = self.state_dir / "buffer"
        if "registry" not in fields or "path" not in self.registry.model_fields_set:
            self.registry.path = self.state_dir / "registry"
        if "trainer" not in fields or "storage_path" not in self.trainer.model_fields_set:
            self.trainer.storage_path = self.state_dir / "ray_results"
        if "tune" not in fields or "storage_path" not in self.tune.model_fields_set:
            self.tune.storage_path = self.state_dir / "tune"
        if self.embedded_broker and (
            "kafka" not in fields or "bootstrap_servers" not in self.kafka.model_fields_set
        ):
            self.kafka.bootstrap_servers = self.broker.bootstrap
        return self


class _FileSource(PydanticBaseSettingsSource):
    """Values read from the config file, ranked below the environment."""

    def __init__(self, settings_cls: type[BaseSettings], data: dict[str, Any]) -> None:
        super().__init__(settings_cls)
        self.data = data

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return self.data.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(self.data)


def load_settings(path: Path | None = None, **overrides: Any) -> Settings:
    """Settings ranked: keyword overrides (the CLI) > environment > ``path`` > defaults."""
    data: dict[str, Any] = {}
    if path is not None:
        if not path.exists():
            raise FileNotFoundError(f"config file {path} does not exist")
        text = path.read_text()
        if path.suffix == ".toml":
            data = tomllib.loads(text)
        elif path.suffix in (".yaml", ".yml"):
            data = yaml.safe_load(text) or {}
        else:
            raise ValueError(f"config file {path} must end in .yaml, .yml or .toml")
        if not isinstance(data, dict):
            raise ValueError(f"config file {path} must hold a mapping at the top level")

    class _Ranked(Settings):
        @classmethod
        def settings_customise_sources(
            cls,
            settings_cls: type[BaseSettings],
            init_settings: PydanticBaseSettingsSource,
            env_settings: PydanticBaseSettingsSource,
            dotenv_settings: PydanticBaseSettingsSource,
            file_secret_settings: PydanticBaseSettingsSource,
        ) -> tuple[PydanticBaseSettingsSource, ...]:
            return (init_settings, env_settings, _FileSource(settings_cls, data))

    return _Ranked(**overrides)
