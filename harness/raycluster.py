"""A real multi-node Ray cluster on one machine: a head and worker nodes from `ray start`.

Each node is its own `ray start --block` process with its own resources, temp dir and ports, so
killing one (SIGKILL to every process under it: raylet, object store, its workers and theirs) is
a lost node as Ray sees it. Used by the cluster test and ``bench.cluster``; nothing here is a
fake of Ray. Every node, driver and probe binds and announces 127.0.0.1 (``harness.loopback``).

Topology (what the README's "scaling out" section describes): the head carries the control
resource and no CPUs for training, the workers carry ``streamtune_train`` (training) and
``streamtune_serve`` (replicas).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import psutil
import yaml

from harness import loopback
from harness.s3server import S3Server
from services.descendants import reap
from serving.config import ServingConfig
from serving.ingress import node_env
from streams.broker import ephemeral_range, free_port

# The custom resources of the topology above: training nodes, serving nodes.
TRAIN, SERVE = "streamtune_train", "streamtune_serve"


@dataclass
class Node:
    name: str
    proc: subprocess.Popen[bytes]
    temp_dir: Path
    resources: dict[str, float]
    node_manager_port: int

    def node_id(self) -> str | None:
        """This node's Ray id (needs a connected driver)."""
        import ray

        for n in ray.nodes():
            if n["NodeManagerPort"] == self.node_manager_port:
                return str(n["NodeID"])
        return None

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None


@dataclass
class LocalCluster:
    """``root`` must be short: Ray's Unix socket paths under it are limited to 107 bytes."""

    root: Path
    head_cpus: int = 1
    object_store_mb: int = 300
    nodes: list[Node] = field(default_factory=list)
    port: int = 0
    dashboard_port: int = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def dashboard(self) -> str:
        """The dashboard's URL: `serve deploy --address` and the job and state APIs use it."""
        return f"http://127.0.0.1:{self.dashboard_port}"

    def env(self) -> dict[str, str]:
        """Environment of the nodes and of any client (driver, `serve deploy`, probe).

        Token authentication is off: the cluster listens on 127.0.0.1 only, and Ray reads the
        mode once per process, at import, which an in-process test driver cannot change.
        """
        return {"RAY_AUTH_MODE": "disabled", **loopback.ENV}

    def connect(self) -> None:
        """Connect this process's driver to the cluster, over loopback."""
        import ray

        loopback.keep()
        ray.init(address=self.address, log_to_driver=False)

    def _ports(self, p: list[int]) -> list[str]:
        # Worker ports below the kernel's ephemeral range (free_port's are above it), one
        # block per node and per process.
        slots = max(1, (ephemeral_range()[0] - 10_000) // 2_000)  # blocks of 5 nodes x 400 ports
        lo = 10_000 + (os.getpid() % slots) * 2_000 + (len(self.nodes) % 5) * 400
        return [
            f"--node-manager-port={p[0]}", f"--object-manager-port={p[1]}",
            f"--metrics-export-port={p[2]}", f"--dashboard-agent-listen-port={p[3]}",
            f"--dashboard-agent-grpc-port={p[4]}", f"--runtime-env-agent-port={p[5]}",
            f"--min-worker-port={lo}", f"--max-worker-port={lo + 399}",
        ]  # fmt: skip

    def _start(self, name: str, args: list[str], resources: dict[str, float]) -> Node:
        temp = self.root / name
        temp.mkdir(parents=True, exist_ok=True)
        ports = [free_port() for _ in range(6)]
        cmd = [*loopback.RAY_START, "start", "--block", "--disable-usage-stats",
               f"--node-ip-address={loopback.LOOPBACK}",
               f"--temp-dir={temp}", f"--object-store-memory={self.object_store_mb << 20}",
               f"--resources={json.dumps(resources)}", *self._ports(ports), *args]  # fmt: skip
        log = (self.root / f"{name}.log").open("ab")
        proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            # Serve's ingress as the default settings choose it (HAProxy), as the RayService sets
            # it on every node; with ports of its own, since these nodes share one machine.
            env=dict(os.environ, **self.env(), **node_env(ServingConfig())),
        )  # fmt: skip
        node = Node(name, proc, temp, resources, ports[0])
        self.nodes.append(node)
        return node

    def start_head(self, resources: dict[str, float] | None = None) -> Node:
        self.port, self.dashboard_port = free_port(), free_port()
        # The dashboard too: it serves the state API (which actor runs where) and the metrics.
        args = ["--head", f"--port={self.port}", f"--num-cpus={self.head_cpus}",
                "--include-dashboard=true", "--dashboard-host=127.0.0.1",
                f"--dashboard-port={self.dashboard_port}",
                f"--ray-client-server-port={free_port()}"]  # fmt: skip
        node = self._start("head", args, resources or {"streamtune_control": 1.0})
        self._wait_nodes(1)
        return node

    def add_worker(self, name: str, cpus: int, resources: dict[str, float]) -> Node:
        for attempt in (1, 2, 3):
            node = self._start(name, [f"--address={self.address}", f"--num-cpus={cpus}"], resources)
            try:
                self._wait_nodes(sum(1 for n in self.nodes if n.alive))
                return node
            except RuntimeError:
                # `ray start` gives up when the GCS answers late (a loaded machine): try again.
                if attempt == 3 or node.alive:
                    raise
                self.nodes.remove(node)
        raise AssertionError("unreachable")

    def serve_deploy(self, port: int, env_vars: dict[str, str]) -> None:
        """`serve deploy` of deploy/serve.yaml's app by a process of its own (not the driver's
        job): HTTP on 127.0.0.1:``port``, settings from ``env_vars``."""
        spec = yaml.safe_load((Path(__file__).parents[1] / "deploy" / "serve.yaml").read_text())
        spec["http_options"]["port"] = port
        spec["proxy_location"] = "HeadOnly"
        spec["applications"][0]["runtime_env"] = {"env_vars": env_vars}
        path = self.root / "serve.yaml"
        path.write_text(yaml.safe_dump(spec))
        for attempt in range(3):
            done = subprocess.run(
                [str(Path(sys.executable).with_name("serve")), "deploy", str(path),
                 "--address", self.dashboard],
                env=dict(os.environ, **self.env()), capture_output=True, text=True, timeout=120,
            )  # fmt: skip
            if done.returncode == 0:
                return
            # Serve's own start-up can lose its proxy actor on a loaded machine (seen once:
            # HAProxyManager "killed by ray.kill" inside serve_start); the request is whole
            # again on a retry. Anything else fails at once.
            if "ActorDiedError" not in done.stderr or attempt == 2:
                raise RuntimeError(f"serve deploy failed:\n{done.stdout}{done.stderr}")
            time.sleep(2.0)

    def kill(self, node: Node) -> list[str]:
        """SIGKILL every process of the node: as abrupt as a machine going away. Returns the
        names of the processes under its ``ray start`` that it ended.

        Its process group is not all of it: Ray gives each worker a group of its own, and a
        worker's children (Serve's HAProxy) would outlive the node, still bound to its ports.
        The node leaves ``nodes`` (a node that dies on its own stays, and fails later waits)."""
        tree = _tree(node)
        names = []
        for p in tree:
            with contextlib.suppress(psutil.Error):
                names.append(p.name())
        os.killpg(node.proc.pid, signal.SIGKILL)
        for p in tree:
            with contextlib.suppress(psutil.Error):
                p.kill()
        node.proc.wait()
        _, alive = psutil.wait_procs(tree, timeout=10)
        if alive:
            raise RuntimeError(f"node {node.name}: {alive} outlived SIGKILL")
        self.nodes.remove(node)
        return names

    def _wait_nodes(self, n: int, timeout_s: float = 180.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            dead = [node for node in self.nodes if not node.alive]
            if dead:  # `ray start --block` exits when its node cannot start
                log = (self.root / f"{dead[0].name}.log").read_text(errors="replace")
                raise RuntimeError(f"Ray node {dead[0].name} exited:\n{log[-2000:]}")
            if self.alive_nodes() >= n:
                return
            time.sleep(0.5)
        raise TimeoutError(f"{n} Ray nodes did not come up; see {self.root}/*.log")

    def alive_nodes(self) -> int:
        try:
            probe = subprocess.run(
                [sys.executable, "-c", _COUNT, self.address], capture_output=True, text=True,
                timeout=30, check=False, env=dict(os.environ, **self.env()),
            )  # fmt: skip
        except subprocess.TimeoutExpired:  # the head is still starting: ask again
            return 0
        try:
            return int(probe.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError):
            return 0

    def stop(self) -> None:
        """Stop every node; then whatever of theirs outlived them (``kill`` says why some do)."""
        trees = [p for node in self.nodes for p in _tree(node)]
        for node in reversed(self.nodes):
            if node.alive:
                os.killpg(node.proc.pid, signal.SIGTERM)
        for node in self.nodes:
            try:
                node.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(node.proc.pid, signal.SIGKILL)
                node.proc.wait()
        reap(trees, time.monotonic() + 10)

    def __enter__(self) -> LocalCluster:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def _tree(node: Node) -> list[psutil.Process]:
    """Every live process under the node's ``ray start`` process, however grouped."""
    try:
        return psutil.Process(node.proc.pid).children(recursive=True)
    except psutil.Error:  # gone already
        return []


# Counted in a child process: this process may not be connected to the cluster (yet).
_COUNT = """
import sys, ray
ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False)
print(sum(1 for n in ray.nodes() if n["Alive"]))
"""


@contextmanager
def cluster_with_s3() -> Iterator[tuple[LocalCluster, list[Node], S3Server, Path]]:
    """S3 and a head with two worker nodes (training and serving), the driver connected."""
    import ray

    root = Path(tempfile.mkdtemp(prefix="st-bc-", dir="/tmp"))  # short: Ray's socket paths
    s3 = S3Server(root / "s3").start()
    s3.create_bucket("bench")
    cluster = LocalCluster(root / "ray")
    try:
        cluster.start_head()
        workers = [cluster.add_worker(f"w{i}", 3, {TRAIN: 1.0, SERVE: 1.0}) for i in (1, 2)]
        cluster.connect()
        yield cluster, workers, s3, root
    finally:
        ray.shutdown()
        cluster.stop()
        s3.stop()
        shutil.rmtree(root, ignore_errors=True)
