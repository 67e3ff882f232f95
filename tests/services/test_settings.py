"""Settings: defaults work with no file, the file is read, the environment wins over it."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from services.settings import load_settings
from streams.config import KafkaConfig


def test_defaults_are_local_and_loopback() -> None:
    s = load_settings()
    assert s.embedded_broker and s.broker.host == "127.0.0.1"
    assert s.kafka.bootstrap_servers == "127.0.0.1:9092"
    assert s.buffer.path == Path("state/buffer")


def test_state_dir_moves_derived_paths(tmp_path: Path) -> None:
    s = load_settings(state_dir=tmp_path)
    assert s.buffer.path == tmp_path / "buffer"
    assert s.broker.state_dir == tmp_path / "kafka"


def test_file_then_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "streamtune.yaml"
    cfg.write_text(
        "embedded_broker: false\n"
        "kafka:\n  bootstrap_servers: a:9092\n"
        "topics:\n  events: from-file\n  partitions: 12\n"
    )
    s = load_settings(cfg)
    assert s.kafka.bootstrap_servers == "a:9092" and s.topics.partitions == 12
    monkeypatch.setenv("STREAMTUNE_TOPICS__EVENTS", "from-env")
    s = load_settings(cfg)
    assert s.topics.events == "from-env" and s.topics.partitions == 12


def test_toml_and_unknown_keys(tmp_path: Path) -> None:
    good = tmp_path / "s.toml"
    good.write_text('[ingest]\ngroup_id = "g2"\n')
    assert load_settings(good).ingest.group_id == "g2"
    bad = tmp_path / "bad.yaml"
    bad.write_text("ingest:\n  group: typo\n")
    with pytest.raises(ValidationError, match="group"):
        load_settings(bad)
    ini = tmp_path / "s.ini"
    ini.write_text("")
    with pytest.raises(ValueError, match=r"\.yaml, \.yml or \.toml"):
        load_settings(ini)


def test_sasl_needs_credentials() -> None:
    with pytest.raises(ValidationError, match="sasl_mechanism"):
        KafkaConfig(security_protocol="SASL_SSL")
    kw = KafkaConfig(
        security_protocol="SASL_SSL",
        sasl_mechanism="SCRAM-SHA-512",
        sasl_username="u",
        sasl_password="p",  # type: ignore[arg-type]
    ).client_kwargs()
    assert kw["sasl_plain_password"] == "p" and kw["security_protocol"] == "SASL_SSL"


def test_continuous_rounds_on_a_long_lived_run_are_the_default_on_one_machine_and_a_cluster() -> (
    None
):
    loop = load_settings().loop
    assert loop.long_lived_trainer and loop.min_round_events <= 100 and loop.max_pending_s <= 5
    both = load_settings(loop={"round_on_cluster": True}).loop
    assert both.long_lived_trainer and both.round_on_cluster
    with pytest.raises(ValidationError, match="min_new_events"):  # the old cadence is gone
        load_settings(loop={"min_new_events": 100})
