"""A second real broker for the security tests: PLAINTEXT (admin) plus a SASL_SSL listener.

The TLS material is made here, at test time, with ``openssl``: a throwaway CA, a broker
certificate it signs (for 127.0.0.1, the advertised host) in a PKCS12 keystore, and a second CA
that trusts nothing of ours. SCRAM users are created when the broker's storage is formatted, PLAIN
users come from its JAAS config; one broker serves every mechanism for the whole session.
"""

from __future__ import annotations

import secrets
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from pydantic import SecretStr

from streams.broker import LocalBroker, free_port
from streams.config import (
    BrokerConfig,
    KafkaConfig,
    SaslMechanism,
    SaslSslListener,
    SaslUser,
)


@dataclass(frozen=True)
class SecureBroker:
    broker: BrokerConfig
    cafile: Path  # the CA that signed the broker's certificate
    untrusted_cafile: Path  # a CA that did not
    user: str
    password: str

    def kafka(
        self, mechanism: SaslMechanism, password: str | None = None, cafile: Path | None = None
    ) -> KafkaConfig:
        """Client settings for the SASL_SSL listener, as a user would write them."""
        assert self.broker.sasl_ssl_bootstrap is not None
        return KafkaConfig(
            bootstrap_servers=self.broker.sasl_ssl_bootstrap,
            security_protocol="SASL_SSL",
            sasl_mechanism=mechanism,
            sasl_username=self.user,
            sasl_password=SecretStr(password or self.password),
            ssl_cafile=cafile or self.cafile,
        )


def _openssl(*args: str | Path) -> None:
    proc = subprocess.run(["openssl", *map(str, args)], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"openssl {args[0]} failed:\n{proc.stderr}")


def _make_ca(folder: Path, name: str) -> tuple[Path, Path]:
    key, cert = folder / f"{name}.key", folder / f"{name}.pem"
    _openssl(
        "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", key, "-out", cert, "-days", "2", "-subj", f"/CN={name}",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
    )  # fmt: skip
    return key, cert


def make_broker_keystore(folder: Path, host: str, password: str) -> tuple[Path, Path, Path]:
    """(keystore.p12, ca.pem, untrusted-ca.pem): a broker certificate for ``host`` signed by a
    fresh CA, and an unrelated CA. EC P-256 keys: quick to make, and Java reads them."""
    folder.mkdir(parents=True, exist_ok=True)
    ca_key, ca = _make_ca(folder, "streamtune-test-ca")
    _, untrusted = _make_ca(folder, "some-other-ca")
    key, csr, cert = folder / "broker.key", folder / "broker.csr", folder / "broker.pem"
    _openssl(
        "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", key, "-out", csr, "-subj", f"/CN={host}",
    )  # fmt: skip
    ext = folder / "broker.ext"
    ext.write_text(
        f"subjectAltName=IP:{host},DNS:localhost\nextendedKeyUsage=serverAuth\n"
        "authorityKeyIdentifier=keyid\n"
    )
    _openssl(
        "x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial",
        "-out", cert, "-days", "2", "-extfile", ext,
    )  # fmt: skip
    keystore = folder / "broker.p12"
    _openssl(
        "pkcs12", "-export", "-in", cert, "-inkey", key, "-certfile", ca, "-name", "broker",
        "-out", keystore, "-passout", f"pass:{password}",
    )  # fmt: skip
    return keystore, ca, untrusted


@pytest.fixture(scope="session")
def secure_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureBroker]:
    if shutil.which("openssl") is None:
        pytest.skip("the SASL_SSL broker's certificates are made with `openssl`, not on PATH")
    root = tmp_path_factory.mktemp("kafka-sasl-ssl")
    store_password = secrets.token_urlsafe(12)
    keystore, ca, untrusted = make_broker_keystore(root / "pki", "127.0.0.1", store_password)
    user, password = "streamtune-app", secrets.token_urlsafe(16)
    cfg = BrokerConfig(
        port=free_port(),
        controller_port=free_port(),
        state_dir=root / "state",
        heap="384m",
        sasl_ssl=SaslSslListener(
            port=free_port(),
            keystore=keystore,
            keystore_password=SecretStr(store_password),
            users=[SaslUser(name=user, password=SecretStr(password))],
        ),
    )
    broker = LocalBroker(cfg)
    broker.up()
    try:
        yield SecureBroker(cfg, ca, untrusted, user, password)
    finally:
        broker.down()
