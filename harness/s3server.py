"""A real S3-compatible server on 127.0.0.1 for tests and the benchmarks.

SeaweedFS (Apache-2.0) built from the Go module proxy, the way the Kafka broker comes from Maven
Central: ``fetch`` runs ``go mod download`` and ``go build`` once into a cache outside the
repository (about 7 CPU-minutes the first time); ``S3Server`` runs ``weed mini`` with every port
given explicitly, waits until S3 answers and creates buckets. Nothing here is a fake: conditional
PUTs (``If-None-Match: *``) are answered by SeaweedFS itself.

``python -m harness.s3server fetch`` builds it ahead of the tests (CI, ``make s3-server``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx

from harness.procs import ServerProcess, log_tail
from streams.broker import free_port
from streams.errors import StorageError
from streams.progress import working

MODULE = "github.com/seaweedfs/seaweedfs"
# SeaweedFS 4.53: the proxy refuses its release tags to `go install`, this pseudo-version it serves.
VERSION = "v0.0.0-20261109003541-7506e5f91cd6"
CACHE = Path.home() / ".cache" / "streamtune" / "seaweedfs"
ACCESS_KEY = "streamtune"
SECRET_KEY = "streamtune-local-secret"


def binary(cache: Path = CACHE) -> Path:
    return cache / f"weed-{VERSION}"


def fetch(cache: Path = CACHE) -> Path:
    """Build ``weed`` once; later calls return the cached binary."""
    out = binary(cache)
    if out.exists():
        return out
    if shutil.which("go") is None:
        raise StorageError("building the local S3 server needs `go` (1.22+) on PATH")
    cache.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, GOFLAGS="-mod=mod")
    with working(f"downloading {MODULE}@{VERSION} from the Go module proxy (once)"):
        dl = subprocess.run(
            ["go", "mod", "download", "-json", f"{MODULE}@{VERSION}"],
            capture_output=True, text=True, env=env, cwd=cache, check=False,
        )  # fmt: skip
    if dl.returncode != 0:
        raise StorageError(f"go mod download {MODULE}@{VERSION} failed:\n{dl.stdout}{dl.stderr}")
    import json

    src = Path(json.loads(dl.stdout)["Dir"])
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    with working("building SeaweedFS with go build (once; ~7 CPU-minutes)", every_s=10.0):
        build = subprocess.run(
            ["go", "build", "-o", str(tmp), "./weed"],
            capture_output=True, text=True, env=env, cwd=src, check=False,
        )  # fmt: skip
    if build.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise StorageError(f"go build of SeaweedFS failed:\n{build.stderr[-4000:]}")
    os.replace(tmp, out)  # another builder's identical binary may be replaced; that is fine
    return out


class S3Server(ServerProcess):
    """One ``weed mini`` (master, volume, filer and S3 gateway in one process) on 127.0.0.1."""

    def __init__(self, state_dir: Path, port: int | None = None, cache: Path = CACHE) -> None:
        self.state_dir = state_dir
        self.port = port or free_port()
        self.cache = cache
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_file = state_dir / "weed.log"

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def options(self) -> dict[str, str]:
        """How to reach this server, as ``StorageConfig.options`` (any process, any node)."""
        return {
            "endpoint": self.endpoint,
            "access_key_id": ACCESS_KEY,
            "secret_access_key": SECRET_KEY,
            "region": "us-east-1",
            "allow_http": "true",
        }

    def start(self, timeout_s: float = 60.0) -> S3Server:
        weed = fetch(self.cache)
        data = self.state_dir / "data"
        data.mkdir(parents=True, exist_ok=True)
        cfg = self.state_dir / "s3.json"
        cfg.write_text(_IDENTITY)
        # Every port explicitly: weed's defaults are fixed numbers, and several servers (tests,
        # the cluster benchmark) may run side by side.
        names = ("master", "master.port.grpc", "volume", "volume.port.grpc", "filer",
                 "filer.port.grpc", "s3.port.grpc", "admin", "admin.port.grpc")  # fmt: skip
        p = {name: free_port() for name in names}
        cmd = [
            str(weed), "mini", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            f"-master.port={p['master']}", f"-master.port.grpc={p['master.port.grpc']}",
            f"-volume.port={p['volume']}", f"-volume.port.grpc={p['volume.port.grpc']}",
            f"-filer.port={p['filer']}", f"-filer.port.grpc={p['filer.port.grpc']}",
            f"-s3.port={self.port}", f"-s3.port.grpc={p['s3.port.grpc']}", f"-s3.config={cfg}",
            f"-admin.port={p['admin']}", f"-admin.port.grpc={p['admin.port.grpc']}",
            "-admin.port.legacy=0", "-admin.ui=false", "-webdav=false", "-s3.port.iceberg=0",
            "-master.volumeSizeLimitMB=64",
        ]  # fmt: skip
        with self.log_file.open("ab") as log:
            self.proc = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                code, tail = self.proc.returncode, log_tail(self.log_file)
                raise StorageError(f"SeaweedFS exited with {code}:\n{tail}")
            try:
                httpx.get(self.endpoint, timeout=1.0)
                return self
            except httpx.HTTPError:
                time.sleep(0.3)
        self.stop()
        tail = log_tail(self.log_file)
        raise StorageError(f"SeaweedFS S3 did not answer on {self.endpoint}:\n{tail}")

    def create_bucket(self, name: str) -> str:
        """Create ``name`` (idempotent); returns ``s3://name``."""
        import pyarrow.fs as pafs

        # object_store cannot create buckets; pyarrow's S3 client can (a signed CreateBucket).
        fs = pafs.S3FileSystem(
            access_key=ACCESS_KEY, secret_key=SECRET_KEY, region="us-east-1", scheme="http",
            endpoint_override=f"127.0.0.1:{self.port}", allow_bucket_creation=True,
        )  # fmt: skip
        fs.create_dir(name)
        return f"s3://{name}"


_IDENTITY = (
    '{"identities": [{"name": "streamtune", "credentials": [{"accessKey": "'
    + ACCESS_KEY
    + '", "secretKey": "'
    + SECRET_KEY
    + '"}], "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}'
)


def main(argv: list[str]) -> None:
    if argv != ["fetch"]:
        sys.exit("usage: python -m harness.s3server fetch")
    t0 = time.monotonic()
    out = fetch()
    print(f"SeaweedFS in {out} ({time.monotonic() - t0:.0f}s)")


if __name__ == "__main__":
    main(sys.argv[1:])
