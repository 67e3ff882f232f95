"""A real schema registry on 127.0.0.1 for tests and the ingest benchmark: Apicurio Registry.

Apicurio Registry (Apache-2.0) publishes its server on Maven Central as a ready-to-run Quarkus
distribution (``io.apicurio:apicurio-registry-app:VERSION:tar.gz:all``), the way the Kafka broker
comes from Maven Central jars: ``fetch`` copies it with Maven and unpacks it once into a cache
outside the repository; ``SchemaRegistryServer`` runs it with its default in-memory H2 storage on
a free port, waits until ``/health/ready`` says UP, and stops it. Clients speak the Confluent
Schema Registry REST API, which Apicurio serves under ``/apis/ccompat/v7`` (``url``), so the
decoder in ``streams.avro`` is tested against the same API a Confluent registry serves.

Version 3.0.9: Apicurio 3.1 and later are compiled for Java 21 (class file 65), and the project's
JDK is 17; 3.0.x runs on 17 and serves the same ccompat v7 API.

``python -m harness.schema_registry fetch`` fetches it ahead of the tests (CI, ``make``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import httpx

from harness.procs import ServerProcess, log_tail
from streams.broker import free_port
from streams.errors import SchemaRegistryError
from streams.progress import working

ARTIFACT = "io.apicurio:apicurio-registry-app"
VERSION = "3.0.9"
CACHE = Path.home() / ".cache" / "streamtune" / "schema-registry"
CCOMPAT = "/apis/ccompat/v7"


def app_dir(cache: Path = CACHE) -> Path:
    return cache / f"apicurio-registry-{VERSION}"


def runner_jar(cache: Path = CACHE) -> Path:
    return app_dir(cache) / f"apicurio-registry-app-{VERSION}-runner.jar"


def fetch(cache: Path = CACHE) -> Path:
    """Fetch and unpack the registry once (about 110 MB); later calls return the cached jar."""
    jar = runner_jar(cache)
    if (app_dir(cache) / ".complete").exists():
        return jar
    if shutil.which("mvn") is None or shutil.which("java") is None:
        raise SchemaRegistryError(
            "the local schema registry needs `java` (17+) and `mvn` on PATH; install a JDK and "
            "Maven, or point avro.registry_url at an existing registry"
        )
    tmp = app_dir(cache).with_name(f"{app_dir(cache).name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    cmd = [
        "mvn", "-q", "-B", "dependency:copy",
        f"-Dartifact={ARTIFACT}:{VERSION}:tar.gz:all", f"-DoutputDirectory={tmp}",
    ]  # fmt: skip
    with working(f"fetching Apicurio Registry {VERSION} from Maven (once, ~110 MB)"):
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    archive = tmp / f"apicurio-registry-app-{VERSION}-all.tar.gz"
    if proc.returncode != 0 or not archive.exists():
        shutil.rmtree(tmp, ignore_errors=True)
        raise SchemaRegistryError(
            f"Maven could not fetch {ARTIFACT}:{VERSION}:\n{proc.stdout}\n{proc.stderr}"
        )
    with working("unpacking Apicurio Registry"), tarfile.open(archive) as tar:
        tar.extractall(tmp, filter="data")
    archive.unlink()
    if not (tmp / jar.name).exists():
        shutil.rmtree(tmp, ignore_errors=True)
        raise SchemaRegistryError(f"{ARTIFACT}:{VERSION} has no {jar.name}; the layout changed")
    (tmp / ".complete").write_text(" ".join(cmd))
    if app_dir(cache).exists():  # another process won the race; its copy is as good as ours
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        tmp.rename(app_dir(cache))
    return jar


class SchemaRegistryServer(ServerProcess):
    """One Apicurio Registry JVM on 127.0.0.1 with in-memory storage (gone when it stops)."""

    def __init__(
        self, state_dir: Path, port: int | None = None, cache: Path = CACHE, heap: str = "256m"
    ) -> None:
        self.state_dir = state_dir
        self.port = port or free_port()
        self.cache = cache
        self.heap = heap
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_file = state_dir / "registry.log"

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        """The Confluent-compatible API root: what ``AvroConfig.registry_url`` takes."""
        return self.base + CCOMPAT

    def start(self, timeout_s: float = 60.0) -> SchemaRegistryServer:
        jar = fetch(self.cache)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        cmd = [
            "java", f"-Xmx{self.heap}", "-XX:+UseSerialGC", "-XX:TieredStopAtLevel=1",
            "-Djava.awt.headless=true",
            "-Dquarkus.http.host=127.0.0.1", f"-Dquarkus.http.port={self.port}",
            "-Dquarkus.log.console.color=false",
            "-jar", str(jar),
        ]  # fmt: skip
        with self.log_file.open("ab") as log:
            self.proc = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, cwd=self.state_dir,
                start_new_session=True,
            )  # fmt: skip
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                code = self.proc.returncode
                self.proc = None
                tail = log_tail(self.log_file)
                raise SchemaRegistryError(f"Apicurio Registry exited with {code}:\n{tail}")
            try:
                # Ready, not merely listening: storage initialised and the API answering.
                if httpx.get(self.base + "/health/ready", timeout=1.0).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise SchemaRegistryError(
            f"Apicurio Registry was not ready on {self.base} within {timeout_s:.0f}s:\n"
            + log_tail(self.log_file)
        )


if __name__ == "__main__":
    if sys.argv[1:] != ["fetch"]:
        sys.exit("usage: python -m harness.schema_registry fetch")
    print(f"Apicurio Registry {VERSION} in {fetch().parent}")
