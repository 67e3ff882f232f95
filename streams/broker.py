"""The embedded Apache Kafka broker: real Kafka 4.x in KRaft mode, from Maven Central jars.

``fetch`` resolves the broker's jars with Maven (deploy/kafka/pom.xml) into a cache outside the
repository; ``up`` formats the storage once, starts ``kafka.Kafka`` as a detached JVM listening on
127.0.0.1 and waits until it answers; ``down`` stops it. State (logs, data, pid) lives under
``BrokerConfig.state_dir`` so several brokers (tests, demo) can coexist on different ports.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import shutil
import signal
import socket
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from streams.config import BrokerConfig, SaslSslListener
from streams.progress import working

POM = Path(__file__).resolve().parent.parent / "deploy" / "kafka" / "pom.xml"

_LOG4J = """\
status = warn
appender.console.type = Console
appender.console.name = STDOUT
appender.console.layout.type = PatternLayout
appender.console.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = {level}
rootLogger.appenderRef.stdout.ref = STDOUT
"""


# Outside the kernel's ephemeral range, where every outgoing connection takes its local port: a
# port handed out here stays free until its server binds it, whereas one the kernel picked (bind
# to 0) can be taken by a Kafka or Ray client's connection in between. Above the range (Linux:
# 61000-65535) by default, clear of the worker-port blocks a local Ray cluster takes below it.
_handed_out: set[int] = set()


def ephemeral_range() -> tuple[int, int]:
    """The ports the kernel hands out on its own, first and last (Linux's default if unknown)."""
    try:
        low, high = (int(x) for x in Path(_EPHEMERAL).read_text().split()[:2])
    except (OSError, ValueError):
        return 32768, 60999
    return low, high


_EPHEMERAL = "/proc/sys/net/ipv4/ip_local_port_range"


def _port_range() -> tuple[int, int]:
    low, high = ephemeral_range()
    return (high + 1, 65536) if high < 64_000 else (20_000, low)


def free_port() -> int:
    """A free TCP port on 127.0.0.1, for brokers and Serve apps started by tests and benchmarks."""
    rng, lo_hi = random.SystemRandom(), _port_range()
    for _ in range(1000):
        port = rng.randrange(*lo_hi)
        if port in _handed_out:
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    raise OSError(f"no free port in {lo_hi[0]}-{lo_hi[1] - 1} on 127.0.0.1")


@dataclass(frozen=True)
class BrokerStatus:
    running: bool
    pid: int | None
    bootstrap: str
    answering: bool
    state_dir: Path


def jar_dir(cfg: BrokerConfig) -> Path:
    """The cached jar folder for the current pom (a pom change means a fresh folder)."""
    digest = hashlib.sha256(POM.read_bytes()).hexdigest()[:12]
    return cfg.jar_cache / f"libs-{digest}"


def fetch(cfg: BrokerConfig) -> Path:
    """Resolve the broker jars with Maven, once; later calls return the cached folder."""
    libs = jar_dir(cfg)
    done = libs / ".complete"
    if done.exists():
        return libs
    if shutil.which("mvn") is None or shutil.which("java") is None:
        raise FileNotFoundError(
            "the embedded Kafka broker needs `java` (17+) and `mvn` on PATH; install a JDK and "
            "Maven, or point kafka.bootstrap_servers at an existing cluster"
        )
    tmp = libs.with_name(libs.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    cmd = [
        "mvn", "-q", "-B", "-f", str(POM), "dependency:copy-dependencies",
        f"-DoutputDirectory={tmp}",
    ]  # fmt: skip
    with working("fetching the Kafka broker jars from Maven (once)"):
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        raise RuntimeError(f"Maven could not fetch the Kafka jars:\n{proc.stdout}\n{proc.stderr}")
    (tmp / ".complete").write_text(" ".join(cmd))
    if libs.exists():  # another process won the race; its copy is as good as ours
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        tmp.rename(libs)
    return libs


def java_cmd(cfg: BrokerConfig, main_class: str, *args: str, heap: str = "256m") -> list[str]:
    """A `java` command line running one of Kafka's main classes from the cached jars."""
    libs = fetch(cfg)
    return ["java", f"-Xmx{heap}", "-cp", f"{libs}/*", main_class, *args]


class LocalBroker:
    """Lifecycle of one embedded broker, identified by its state directory."""

    def __init__(self, cfg: BrokerConfig) -> None:
        self.cfg = cfg
        self.state = cfg.state_dir.resolve()
        self.pid_file = self.state / "broker.pid"
        self.log_file = self.state / "broker.log"

    # -- status -------------------------------------------------------------------------
    def pid(self) -> int | None:
        try:
            pid = int(self.pid_file.read_text())
        except (FileNotFoundError, ValueError):
            return None
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        return pid

    def answering(self) -> bool:
        try:
            with socket.create_connection((self.cfg.host, self.cfg.port), timeout=1.0):
                return True
        except OSError:
            return False

    def status(self) -> BrokerStatus:
        pid = self.pid()
        return BrokerStatus(
            running=pid is not None,
            pid=pid,
            bootstrap=self.cfg.bootstrap,
            answering=pid is not None and self.answering(),
            state_dir=self.state,
        )

    # -- lifecycle ----------------------------------------------------------------------
    def up(self) -> BrokerStatus:
        """Start the broker unless it runs already; return once it serves metadata."""
        if self.pid() is not None:
            self._wait_ready()
            return self.status()
        if self.answering():
            raise RuntimeError(
                f"port {self.cfg.port} on {self.cfg.host} is taken by another process; stop it "
                "or choose another broker port"
            )
        self.state.mkdir(parents=True, exist_ok=True)
        props = self._write_config()
        if not (self.state / "data" / "meta.properties").exists():
            self._format(props)
        env = dict(os.environ, KAFKA_HEAP_OPTS=f"-Xmx{self.cfg.heap}")
        cmd = [
            "java", f"-Xmx{self.cfg.heap}", "-Xms128m", "-XX:+UseG1GC", "-XX:MaxGCPauseMillis=20",
            "-Djava.awt.headless=true",
            f"-Dlog4j2.configurationFile={self.state / 'log4j2.properties'}",
            f"-Dkafka.logs.dir={self.state / 'logs'}",
            "-cp", f"{fetch(self.cfg)}/*", "kafka.Kafka", str(props),
        ]  # fmt: skip
        with self.log_file.open("ab") as log:
            # A new session: the broker outlives the CLI call that started it.
            proc = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        self.pid_file.write_text(str(proc.pid))
        self._wait_ready(proc)
        return self.status()

    def down(self, timeout_s: float = 30.0) -> bool:
        """Stop the broker (SIGTERM, then SIGKILL). Returns whether one was running."""
        pid = self.pid()
        if pid is None:
            self.pid_file.unlink(missing_ok=True)
            return False
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and self.pid() is not None:
            _reap(pid)
            time.sleep(0.2)
        if self.pid() is not None:
            os.kill(pid, signal.SIGKILL)
            time.sleep(0.5)
            _reap(pid)
        self.pid_file.unlink(missing_ok=True)
        return True

    # -- internals ----------------------------------------------------------------------
    def _write_config(self) -> Path:
        c = self.cfg
        props = self.state / "server.properties"
        listeners = f"PLAINTEXT://{c.host}:{c.port},CONTROLLER://{c.host}:{c.controller_port}"
        advertised = f"PLAINTEXT://{c.host}:{c.port}"
        protocols = "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT"
        if c.sasl_ssl is not None:
            listeners += f",SASL_SSL://{c.host}:{c.sasl_ssl.port}"
            advertised += f",SASL_SSL://{c.host}:{c.sasl_ssl.port}"
            protocols += ",SASL_SSL:SASL_SSL"
        props.write_text(
            "\n".join(
                [
                    "process.roles=broker,controller",
                    "node.id=1",
                    f"controller.quorum.bootstrap.servers={c.host}:{c.controller_port}",
                    f"listeners={listeners}",
                    f"advertised.listeners={advertised}",
                    "controller.listener.names=CONTROLLER",
                    f"listener.security.protocol.map={protocols}",
                    "inter.broker.listener.name=PLAINTEXT",
                    f"log.dirs={self.state / 'data'}",
                    "num.partitions=4",
                    "offsets.topic.replication.factor=1",
                    "offsets.topic.num.partitions=8",
                    "transaction.state.log.replication.factor=1",
                    "transaction.state.log.min.isr=1",
                    "share.coordinator.state.topic.replication.factor=1",
                    "share.coordinator.state.topic.min.isr=1",
                    "group.initial.rebalance.delay.ms=0",
                    "auto.create.topics.enable=true",
                    # Oversized events are dead-lettered by ingest, so the broker must accept them.
                    "message.max.bytes=4194304",
                    "log.retention.hours=168",
                    *(_sasl_ssl_properties(c.sasl_ssl) if c.sasl_ssl else []),
                    "",
                ]
            )
        )
        (self.state / "log4j2.properties").write_text(_LOG4J.format(level="WARN"))
        return props

    def _format(self, props: Path) -> None:
        cluster_id = _kraft_cluster_id()
        # "--cluster-id=ID", not "-t ID": a random id may start with "-" (base64url), which the
        # tool's argument parser would take for an option.
        cmd = java_cmd(
            self.cfg, "kafka.tools.StorageTool", "format", f"--cluster-id={cluster_id}",
            "-c", str(props), "--standalone", "--ignore-formatted",
            *_scram_arguments(self.cfg.sasl_ssl),
        )  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"kafka-storage format failed:\n{proc.stdout}\n{proc.stderr}")

    def _wait_ready(self, proc: subprocess.Popen[bytes] | None = None) -> None:
        # Ready means the broker serves metadata, not merely that the port is open.
        from kafka import KafkaAdminClient
        from kafka.errors import KafkaError

        deadline = time.monotonic() + self.cfg.start_timeout_s
        while time.monotonic() < deadline:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(
                    f"the Kafka broker exited with {proc.returncode}; last log lines:\n"
                    + self._log_tail()
                )
            if self.answering():
                try:
                    admin = KafkaAdminClient(
                        bootstrap_servers=self.cfg.bootstrap, request_timeout_ms=5000
                    )
                    try:
                        if admin.describe_cluster().get("brokers"):
                            return
                    finally:
                        admin.close()
                except (KafkaError, OSError):
                    pass
            time.sleep(0.3)
        raise TimeoutError(
            f"the Kafka broker did not answer on {self.cfg.bootstrap} within "
            f"{self.cfg.start_timeout_s:.0f}s; see {self.log_file}:\n{self._log_tail()}"
        )

    def _log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"


def _sasl_ssl_properties(listener: SaslSslListener) -> list[str]:
    """server.properties lines of the SASL_SSL listener, all scoped to it by the listener prefix."""
    pre = "listener.name.sasl_ssl."
    password = listener.keystore_password.get_secret_value()
    plain_users = " ".join(
        f'user_{u.name}="{u.password.get_secret_value()}"' for u in listener.users
    )
    lines = [
        f"{pre}ssl.keystore.type=PKCS12",
        f"{pre}ssl.keystore.location={listener.keystore.resolve()}",
        f"{pre}ssl.keystore.password={password}",
        f"{pre}ssl.key.password={password}",
        f"{pre}sasl.enabled.mechanisms={','.join(listener.mechanisms)}",
    ]
    for mech in listener.mechanisms:
        if mech == "PLAIN":
            # PLAIN checks passwords against this list; SCRAM against the cluster metadata.
            module = (
                f"org.apache.kafka.common.security.plain.PlainLoginModule required {plain_users};"
            )
        else:
            module = "org.apache.kafka.common.security.scram.ScramLoginModule required;"
        lines.append(f"{pre}{mech.lower()}.sasl.jaas.config={module}")
    return lines


def _scram_arguments(listener: SaslSslListener | None) -> list[str]:
    """kafka-storage format's --add-scram arguments: SCRAM users exist from the first start."""
    if listener is None:
        return []
    return [
        arg
        for mech in listener.mechanisms
        if mech.startswith("SCRAM")
        for u in listener.users
        for arg in (
            "--add-scram",
            f'{mech}=[name="{u.name}",password="{u.password.get_secret_value()}"]',
        )
    ]


def _kraft_cluster_id() -> str:
    # KRaft cluster ids are 16 random bytes, base64url without padding (22 chars).
    import base64

    return base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")


def _reap(pid: int) -> None:
    with contextlib.suppress(ChildProcessError):  # not our child: nothing to reap
        os.waitpid(pid, os.WNOHANG)
