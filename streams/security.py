"""A secured Kafka connection, checked once up front so that bad settings fail fast by name.

kafka-python treats a refused TLS handshake or SASL login like an unreachable broker: it retries
and, 30 s later, reports only "Unable to bootstrap". (It even drops the broker's
SASL_AUTHENTICATION_FAILED answer when the broker closes the connection right behind it.)
``check_connection`` opens one connection itself - TLS as kafka-python sets it up, then Kafka's
SaslHandshake and SaslAuthenticate requests carrying kafka-python's own mechanism (PLAIN, SCRAM)
bytes - and turns a refusal into a ``KafkaSecurityError`` that names the setting to fix.
"""

from __future__ import annotations

import socket
import ssl
import struct
from typing import Any

from kafka.net.sasl import get_sasl_mechanism

from streams.config import KafkaConfig
from streams.errors import KafkaSecurityError, StreamsError

_SASL_HANDSHAKE = 17  # Kafka API keys, both used at version 1 (non-flexible encoding)
_SASL_AUTHENTICATE = 36
_UNSUPPORTED_SASL_MECHANISM = 33  # Kafka error codes
_SASL_AUTHENTICATION_FAILED = 58
# OpenSSL's X509_V_ERR_HOSTNAME_MISMATCH and X509_V_ERR_IP_ADDRESS_MISMATCH
_HOSTNAME_MISMATCH = {62, 64}


def check_connection(kafka: KafkaConfig, timeout_s: float = 10.0) -> None:
    """Connect to the first reachable bootstrap server with ``kafka``'s TLS and SASL settings.

    Raises ``KafkaSecurityError`` when the broker's certificate is not trusted, the listener does
    not speak the configured protocol, or the SASL mechanism or credentials are refused. Does
    nothing for PLAINTEXT, and when no server answers at all (not a security matter: the clients
    keep retrying as they always do).
    """
    if kafka.security_protocol == "PLAINTEXT":
        return
    tls = _tls_context(kafka) if kafka.security_protocol.endswith("SSL") else None
    for server in (s.strip() for s in kafka.bootstrap_servers.split(",")):
        host, port = _host_port(server)
        try:
            sock = socket.create_connection((host, port), timeout=timeout_s)
        except OSError:
            continue
        try:
            conn = _handshake(sock, tls, host, server, kafka) if tls else sock
            try:
                if kafka.sasl_mechanism:
                    _authenticate(conn, host, server, kafka, timeout_s)
            finally:
                conn.close()
        finally:
            sock.close()
        return


def _host_port(server: str) -> tuple[str, int]:
    host, _, port = server.rpartition(":")
    return host.strip("[]"), int(port)


def _tls_context(kafka: KafkaConfig) -> ssl.SSLContext:
    # The context kafka-python builds: TLS 1.2+, certificate and host name verified.
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        if kafka.ssl_cafile is not None:
            ctx.load_verify_locations(kafka.ssl_cafile)
        else:
            ctx.load_default_certs()
    except (OSError, ssl.SSLError) as err:
        raise KafkaSecurityError(
            "kafka.ssl_cafile",
            f"cannot load the CA bundle kafka.ssl_cafile={kafka.ssl_cafile}: {err}",
        ) from err
    if kafka.ssl_certfile is not None:
        try:
            ctx.load_cert_chain(kafka.ssl_certfile, kafka.ssl_keyfile)
        except (OSError, ssl.SSLError) as err:
            raise KafkaSecurityError(
                "kafka.ssl_certfile / kafka.ssl_keyfile",
                f"cannot load the client certificate {kafka.ssl_certfile}: {err}",
            ) from err
    return ctx


def _handshake(
    sock: socket.socket, ctx: ssl.SSLContext, host: str, server: str, kafka: KafkaConfig
) -> ssl.SSLSocket:
    try:
        return ctx.wrap_socket(sock, server_hostname=host)
    except ssl.SSLCertVerificationError as err:
        if err.verify_code in _HOSTNAME_MISMATCH:
            raise KafkaSecurityError(
                "kafka.bootstrap_servers",
                f"the TLS certificate of broker {server} is not valid for the name {host!r} "
                f"({err.verify_message}); connect by a name the certificate lists",
            ) from err
        trusted = kafka.ssl_cafile or "the system CAs (kafka.ssl_cafile is unset)"
        raise KafkaSecurityError(
            "kafka.ssl_cafile",
            f"the TLS certificate of broker {server} is not trusted by {trusted}: "
            f"{err.verify_message}; set kafka.ssl_cafile to the CA that signed it",
        ) from err
    except (ssl.SSLError, ConnectionError, TimeoutError) as err:
        raise KafkaSecurityError(
            "kafka.security_protocol",
            f"TLS handshake with {server} failed ({err}): is it a TLS listener? "
            f"kafka.security_protocol={kafka.security_protocol}",
        ) from err


def _authenticate(
    conn: socket.socket, host: str, server: str, kafka: KafkaConfig, timeout_s: float
) -> None:
    mech = kafka.sasl_mechanism
    assert mech is not None
    wire = _Wire(conn, kafka.client_id)
    listener = f"is it a {kafka.security_protocol} listener?"
    try:
        reply = wire.request(_SASL_HANDSHAKE, _string(mech))
    except ConnectionError as err:
        raise KafkaSecurityError(
            "kafka.security_protocol",
            f"broker {server} closed the connection at the SASL handshake ({err}): {listener}",
        ) from err
    except TimeoutError as err:
        raise KafkaSecurityError(
            "kafka.security_protocol",
            f"broker {server} did not answer the SASL handshake in {timeout_s:.0f}s: {listener}",
        ) from err
    error = reply.int16()
    enabled = [reply.string() for _ in range(reply.int32())]
    if error == _UNSUPPORTED_SASL_MECHANISM:
        raise KafkaSecurityError(
            "kafka.sasl_mechanism",
            f"broker {server} does not enable SASL mechanism {mech}; it enables {enabled}",
        )
    if error:
        raise KafkaSecurityError(
            "kafka.security_protocol",
            f"broker {server} refused the SASL handshake (Kafka error {error}): {listener}",
        )
    mechanism: Any = get_sasl_mechanism(mech)(host=host, **kafka.client_kwargs())
    refused = (
        f"broker {server} refused the SASL {mech} login of kafka.sasl_username="
        f"{kafka.sasl_username!r}"
    )
    fix = "kafka.sasl_password"  # or the user name, which the message shows
    while not mechanism.is_done():
        try:
            reply = wire.request(_SASL_AUTHENTICATE, _bytes(mechanism.auth_bytes()))
        except ConnectionError as err:
            # A broker closes the connection after a failed login; a healthy one never mid-login.
            raise KafkaSecurityError(fix, f"{refused}: the connection was closed") from err
        error, message = reply.int16(), reply.nullable_string()
        if error:
            kind = "" if error == _SASL_AUTHENTICATION_FAILED else f" (Kafka error {error})"
            raise KafkaSecurityError(fix, f"{refused}{kind}: {message}")
        mechanism.receive(reply.blob())
    if not mechanism.is_authenticated():
        raise KafkaSecurityError(fix, refused)


def _string(s: str) -> bytes:
    raw = s.encode()
    return struct.pack(">h", len(raw)) + raw


def _bytes(b: bytes) -> bytes:
    return struct.pack(">i", len(b)) + b


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def _take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise StreamsError("truncated Kafka response during the connection check")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def int16(self) -> int:
        return int(struct.unpack(">h", self._take(2))[0])

    def int32(self) -> int:
        return int(struct.unpack(">i", self._take(4))[0])

    def nullable_string(self) -> str | None:
        n = self.int16()
        return None if n < 0 else self._take(n).decode(errors="replace")

    def string(self) -> str:
        return self.nullable_string() or ""

    def blob(self) -> bytes:
        n = self.int32()
        return b"" if n < 0 else self._take(n)


class _Wire:
    """Kafka's request/response framing (request header v1, response header v0), blocking."""

    def __init__(self, conn: socket.socket, client_id: str) -> None:
        self.conn, self.client_id, self.correlation = conn, client_id, 0

    def request(self, api_key: int, body: bytes, version: int = 1) -> _Reader:
        self.correlation += 1
        header = struct.pack(">hhi", api_key, version, self.correlation) + _string(self.client_id)
        frame = header + body
        try:
            self.conn.sendall(struct.pack(">i", len(frame)) + frame)
            (size,) = struct.unpack(">i", self._recv(4))
            reply = _Reader(self._recv(size))
        except ssl.SSLError as err:  # TLS's way of saying the peer went away (or alerted)
            raise ConnectionResetError(str(err)) from err
        if reply.int32() != self.correlation:
            raise StreamsError("out-of-order Kafka response during the connection check")
        return reply

    def _recv(self, n: int) -> bytes:
        chunks, left = [], n
        while left:
            chunk = self.conn.recv(left)
            if not chunk:
                raise ConnectionResetError("the broker closed the connection")
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)
