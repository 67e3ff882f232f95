"""streamtune against a broker that requires TLS and SASL: the real SASL_SSL listener.

One broker (``secure_broker`` in tests/streams/conftest.py) enables PLAIN, SCRAM-SHA-256 and
SCRAM-SHA-512 on its SASL_SSL listener; the tests run over each mechanism. Clients are given the
SASL_SSL port only, and the broker advertises to each client the listener it came in on, so every
request - admin, produce, ingest, dead letters, the history tail - crosses TLS after a SASL login.
"""

from __future__ import annotations

import json
import os
import random
import signal
import threading
import time
from pathlib import Path

import pytest
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from pydantic import SecretStr, ValidationError

from streams.admin import ensure_topics
from streams.broker import LocalBroker, _scram_arguments
from streams.buffer import EventBuffer
from streams.config import (
    BrokerConfig,
    BufferConfig,
    IngestConfig,
    KafkaConfig,
    SaslMechanism,
    SaslSslListener,
    SaslUser,
    TopicsConfig,
)
from streams.datasets import DriftSpec, synthetic_drift
from streams.errors import KafkaSecurityError
from streams.ingest import Ingestor
from streams.producer import replay
from streams.tail import EventTail
from tests.streams.conftest import SecureBroker
from tests.streams.test_ingest_kafka import (
    _ingest_subprocess,
    _logs,
    assert_exactly_once,
    ingest_once,
)

MECHANISMS: list[SaslMechanism] = ["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"]


def security_env(kafka: KafkaConfig) -> dict[str, str]:
    """The settings a deployment sets for a SASL_SSL cluster, as STREAMTUNE_* variables."""
    assert kafka.sasl_mechanism and kafka.sasl_username and kafka.sasl_password
    return {
        "STREAMTUNE_KAFKA__SECURITY_PROTOCOL": kafka.security_protocol,
        "STREAMTUNE_KAFKA__SASL_MECHANISM": kafka.sasl_mechanism,
        "STREAMTUNE_KAFKA__SASL_USERNAME": kafka.sasl_username,
        "STREAMTUNE_KAFKA__SASL_PASSWORD": kafka.sasl_password.get_secret_value(),
        "STREAMTUNE_KAFKA__SSL_CAFILE": str(kafka.ssl_cafile),
    }


def read_dead_letters(
    kafka: KafkaConfig, topic: str, want: int, timeout: float = 30.0
) -> list[tuple[str, int, int]]:
    """(reason, source partition, source offset) of every dead letter, read without a group
    (no join to wait for on a loaded machine), until ``want`` arrived and then a little more."""
    consumer = KafkaConsumer(**kafka.client_kwargs(), enable_auto_commit=False)
    try:
        tp = TopicPartition(topic, 0)
        consumer.assign([tp])
        consumer.seek_to_beginning(tp)
        out: list[tuple[str, int, int]] = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            polled = consumer.poll(timeout_ms=300 if len(out) < want else 1000)
            for m in polled.get(tp, []):
                h = {k: v.decode() for k, v in m.headers}
                out.append((h["reason"], int(h["source_partition"]), int(h["source_offset"])))
            if len(out) >= want and not polled:
                break
        return out
    finally:
        consumer.close()


def drain(tail: EventTail, want: int, timeout: float = 30.0) -> list[str]:
    got: list[str] = []
    deadline = time.monotonic() + timeout
    while len(got) < want and time.monotonic() < deadline:
        got += [e.event_id for e in tail.poll(timeout_ms=200)]
    got += [e.event_id for e in tail.poll(timeout_ms=300)]  # and nothing more arrives
    return got


# -- the whole path over SASL_SSL ---------------------------------------------------------------
@pytest.mark.parametrize("mechanism", MECHANISMS)
@pytest.mark.integration
@pytest.mark.slow
def test_produce_ingest_dead_letter_and_history_over_sasl_ssl(
    secure_broker: SecureBroker, topics: TopicsConfig, tmp_path: Path, mechanism: SaslMechanism
) -> None:
    kafka = secure_broker.kafka(mechanism)
    assert ensure_topics(kafka, topics) == [topics.events, topics.dead_letter]
    # The history consumer, following the topic from its beginning (an empty buffer).
    tail = EventTail(kafka, topics, f"history-{topics.events}", start={})
    good = list(synthetic_drift(DriftSpec(events=2_000, seed=MECHANISMS.index(mechanism))))
    assert replay(good, kafka, topics.events) == len(good)
    valid = json.loads(good[0].encode())
    poison = [
        ("undecodable", b"\xff\xfe not json"),
        ("schema", json.dumps({**valid, "event_type": "teleport"}).encode()),
        ("schema", json.dumps({**valid, "ts": "yesterday"}).encode()),
    ]
    prod = KafkaProducer(**kafka.client_kwargs())
    sent_bad = []
    for reason, payload in poison:
        meta = prod.send(topics.events, key=good[0].key(), value=payload).get(timeout=30)
        sent_bad.append((reason, meta.partition, meta.offset))
    prod.close()

    buf = EventBuffer(BufferConfig(path=tmp_path / "buf"))
    ing = ingest_once(kafka, topics, buf)
    ids = buf.read()["event_id"].to_pylist()
    assert len(ids) == len(set(ids)) and set(ids) == {e.event_id for e in good}
    assert ing.stats.ingested == len(good) and ing.stats.dead_letter_total == len(poison)
    assert sum(buf.watermark().values()) == len(good) + len(poison)

    dead = read_dead_letters(kafka, topics.dead_letter, want=len(sent_bad))
    assert sorted(dead) == sorted(sent_bad)

    try:
        seen = drain(tail, len(good))
    finally:
        tail.close()
    assert sorted(seen) == sorted(e.event_id for e in good)  # each once; the poison skipped


@pytest.mark.integration
@pytest.mark.slow
def test_kill_9_over_scram_sha_512_loses_and_duplicates_nothing(
    secure_broker: SecureBroker, topics: TopicsConfig, tmp_path: Path
) -> None:
    """test_ingest_kafka's crash test, over SASL_SSL: the CLI's ingest, SIGKILLed mid-stream."""
    kafka = secure_broker.kafka("SCRAM-SHA-512")
    ensure_topics(kafka, topics)
    events = list(synthetic_drift(DriftSpec(events=15_000, seed=17)))
    producer = threading.Thread(
        target=replay, args=(events, kafka, topics.events), kwargs={"rate": 750.0}
    )
    producer.start()
    buf_cfg = BufferConfig(path=tmp_path / "buf")
    rng = random.Random(99)
    kills, rows_seen = 0, [0]

    def rows() -> int:
        return EventBuffer(buf_cfg).stats().rows

    while producer.is_alive() or kills < 6:
        proc = _ingest_subprocess(
            kafka, topics, buf_cfg, tmp_path, **security_env(kafka),
            STREAMTUNE_INGEST__INSTANCE_ID="ingest-0", STREAMTUNE_INGEST__MAX_POLL_RECORDS="300",
        )  # fmt: skip
        deadline = time.monotonic() + 8.0
        while rows() == rows_seen[-1] and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        assert proc.poll() is None, _logs(tmp_path)  # it ran until killed: it could connect
        time.sleep(rng.uniform(0.0, 1.0))
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        kills += 1
        rows_seen.append(rows())
    producer.join()
    # Kills landed while data flowed: several left the buffer part-filled, each differently.
    assert len({r for r in rows_seen if 0 < r < len(events)}) >= 3, rows_seen
    buf = EventBuffer(buf_cfg)
    ingest_once(kafka, topics, buf)
    assert_exactly_once(buf, {e.event_id for e in events}, topics.events)


# -- refusals fail fast, naming the setting -------------------------------------------------------
@pytest.mark.parametrize("mechanism", MECHANISMS)
@pytest.mark.integration
def test_wrong_password_fails_fast_naming_the_setting(
    secure_broker: SecureBroker, topics: TopicsConfig, tmp_path: Path, mechanism: SaslMechanism
) -> None:
    kafka = secure_broker.kafka(mechanism, password="not-the-password")
    t0 = time.monotonic()
    with pytest.raises(KafkaSecurityError, match=r"kafka\.sasl_password") as err:
        ensure_topics(kafka, topics)
    assert err.value.setting == "kafka.sasl_password"
    assert "Authentication failed" in str(err.value)  # the broker's own reason comes through
    assert secure_broker.user in str(err.value) and "not-the-password" not in str(err.value)
    ing = Ingestor(
        kafka, topics, IngestConfig(group_id="g"), EventBuffer(BufferConfig(path=tmp_path))
    )
    with pytest.raises(KafkaSecurityError, match=r"kafka\.sasl_password"):
        ing.run()
    assert time.monotonic() - t0 < 10  # kafka-python alone gives up after 30 s, saying less


@pytest.mark.integration
def test_untrusted_certificate_fails_fast_naming_the_setting(
    secure_broker: SecureBroker, topics: TopicsConfig, tmp_path: Path
) -> None:
    kafka = secure_broker.kafka("SCRAM-SHA-512", cafile=secure_broker.untrusted_cafile)
    t0 = time.monotonic()
    with pytest.raises(KafkaSecurityError, match=r"kafka\.ssl_cafile") as err:
        ensure_topics(kafka, topics)
    assert err.value.setting == "kafka.ssl_cafile"
    assert "not trusted" in str(err.value) and str(secure_broker.untrusted_cafile) in str(err.value)
    ing = Ingestor(
        kafka, topics, IngestConfig(group_id="g"), EventBuffer(BufferConfig(path=tmp_path))
    )
    with pytest.raises(KafkaSecurityError, match=r"kafka\.ssl_cafile"):
        ing.run()
    assert time.monotonic() - t0 < 10


@pytest.mark.integration
def test_listener_requires_tls(secure_broker: SecureBroker, topics: TopicsConfig) -> None:
    """Proof that the listener is TLS: the same login without TLS is refused, by name."""
    kafka = secure_broker.kafka("PLAIN").model_copy(update={"security_protocol": "SASL_PLAINTEXT"})
    with pytest.raises(KafkaSecurityError) as err:
        ensure_topics(kafka, topics)
    assert err.value.setting == "kafka.security_protocol"


@pytest.mark.integration
def test_cli_ingest_exits_at_once_on_a_wrong_password(
    secure_broker: SecureBroker, topics: TopicsConfig, tmp_path: Path
) -> None:
    kafka = secure_broker.kafka("SCRAM-SHA-512", password="not-the-password")
    t0 = time.monotonic()
    proc = _ingest_subprocess(
        kafka, topics, BufferConfig(path=tmp_path / "buf"), tmp_path, **security_env(kafka)
    )
    assert proc.wait(timeout=60) != 0
    assert time.monotonic() - t0 < 30
    assert "kafka.sasl_password" in _logs(tmp_path)


# -- configuration, no broker ------------------------------------------------------------------
def test_default_broker_renders_plaintext_only(tmp_path: Path) -> None:
    props = LocalBroker(BrokerConfig(state_dir=tmp_path))._write_config().read_text()
    lines = props.splitlines()
    assert "listeners=PLAINTEXT://127.0.0.1:9092,CONTROLLER://127.0.0.1:9093" in lines
    assert "advertised.listeners=PLAINTEXT://127.0.0.1:9092" in lines
    assert "listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT" in lines
    assert "sasl" not in props.lower() and "ssl" not in props.lower()
    assert _scram_arguments(None) == []


def test_sasl_ssl_listener_renders_every_mechanism(tmp_path: Path) -> None:
    listener = SaslSslListener(
        port=9094, keystore=tmp_path / "k.p12", keystore_password=SecretStr("pw"),
        users=[SaslUser(name="app", password=SecretStr("s3cret"))],
    )  # fmt: skip
    cfg = BrokerConfig(state_dir=tmp_path, sasl_ssl=listener)
    lines = LocalBroker(cfg)._write_config().read_text().splitlines()
    assert "advertised.listeners=PLAINTEXT://127.0.0.1:9092,SASL_SSL://127.0.0.1:9094" in lines
    assert any(
        line.startswith("listener.name.sasl_ssl.plain.sasl.jaas.config=")
        and 'user_app="s3cret"' in line
        for line in lines
    )
    assert _scram_arguments(listener) == [
        "--add-scram", 'SCRAM-SHA-256=[name="app",password="s3cret"]',
        "--add-scram", 'SCRAM-SHA-512=[name="app",password="s3cret"]',
    ]  # fmt: skip
    assert cfg.sasl_ssl_bootstrap == "127.0.0.1:9094"


def test_broker_settings_refuse_what_would_break_the_broker(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="password"):
        SaslUser(name="app", password=SecretStr('a"b'))  # would end the JAAS string early
    listener = SaslSslListener(
        port=9092, keystore=tmp_path / "k.p12", keystore_password=SecretStr("pw"),
        users=[SaslUser(name="app", password=SecretStr("pw"))],
    )  # fmt: skip
    with pytest.raises(ValidationError, match="ports must differ"):
        BrokerConfig(state_dir=tmp_path, sasl_ssl=listener)
