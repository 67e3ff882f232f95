"""Cluster mode on a real multi-node Ray cluster: the whole loop, state on S3, a lost node.

A head and two worker nodes started with `ray start` (separate process groups, their own
resources, temp dirs and ports), the project's SeaweedFS S3 server and the real broker. The driver
runs what `up --address ... --no-serve` runs: ingest (Kafka -> buffer on S3), the loop, and the
control plane, which lands in the cluster (the history actor and the rollout controller as named,
detached actors on the head). Each round is planned by the driver (segment names and offsets
only) and runs as a Ray task on a worker node, which reads its segments from S3, trains through
the driver's long-lived Ray Train + DeepSpeed run (its workers on the worker nodes, its feeder on
the head, checkpoints on S3) and registers in the registry on S3. The Serve app is
deployed on its own (`serve deploy` of deploy/serve.yaml, by another process) onto the worker
nodes and follows the controller: two promotions reach its replicas, then a version that fails
live is rolled back. Mid-round (after its first epoch checkpoint) a worker node hosting a
training worker is SIGKILLed; the long-lived run's restarted workers must resume the round from
that checkpoint and still register exactly one version for its slice. Last, the controller's
process is killed: Ray restarts it and it resumes from its state in the registry.

This module runs in a pytest process of its own (see the Makefile): its driver joins an
external cluster, which an earlier in-process `ray.init` would prevent.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import ray

from harness.cluster_probes import checkpointed, state_address, train_worker_nodes
from harness.cluster_settings import cluster_settings, serve_env
from harness.liveclient import LiveClient, register_broken_copy
from harness.raycluster import SERVE, TRAIN, LocalCluster, Node
from harness.s3server import S3Server
from services.runtime import Running, start
from streams.admin import ensure_topics
from streams.broker import free_port
from streams.config import KafkaConfig, TopicsConfig
from streams.datasets import DriftSpec, synthetic_drift
from streams.producer import replay
from streams.storage import StorageConfig
from training.registry import Registry

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _round_task_nodes() -> set[str]:
    from ray.util.state import list_tasks

    running = list_tasks(state_address(), filters=[("state", "=", "RUNNING")], limit=1000)
    return {t.node_id for t in running if t.name and "run_planned" in t.name and t.node_id}


def _actor_nodes(class_name: str) -> set[str]:
    from ray.util.state import list_actors

    alive = list_actors(state_address(), filters=[("state", "=", "ALIVE")], limit=1000)
    return {a.node_id for a in alive if a.node_id and class_name in (a.class_name or "")}


def _history_state(user: str) -> dict[str, Any]:
    """What the history actor holds, for a failure's message."""
    from serving.context import find_context

    ctx = find_context()
    if ctx is None:
        return {"context": None}
    snap = ray.get(ctx.snapshot.remote(), timeout=30)
    return {**{k: v for k, v in snap.items() if k != "versions"},
            "user_history": ray.get(ctx.get_history.remote(user), timeout=30)}  # fmt: skip


def _wait_rows(running: Running, n: int, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while running.buffer.stats().rows < n:
        assert time.time() < deadline, f"ingest stalled at {running.buffer.stats().rows} of {n}"
        time.sleep(0.5)


def test_cluster_rounds_on_workers_state_on_s3_a_separate_serve_app_and_a_lost_node(
    kafka: KafkaConfig, topics: TopicsConfig, s3_server: S3Server, tmp_path: Path
) -> None:
    ensure_topics(kafka, topics)
    prefix = f"s3://streamtune-test/cluster-{uuid.uuid4().hex[:8]}"
    s = cluster_settings(
        tmp_path, kafka, topics, prefix, StorageConfig(options=s3_server.options())
    )
    events = list(synthetic_drift(DriftSpec(users=60, events=9000, seed=5)))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    # Under /tmp directly: Ray's socket paths below a pytest tmp_path exceed 107 bytes.
    root = Path(tempfile.mkdtemp(prefix="st-ray-", dir="/tmp"))
    with LocalCluster(root) as cluster:
        cluster.start_head()
        workers = [cluster.add_worker(f"w{i}", 3, {TRAIN: 1.0, SERVE: 1.0}) for i in (1, 2)]
        cluster.connect()
        running: Running | None = None
        try:
            head_id = cluster.nodes[0].node_id()
            worker_ids = {w.node_id() for w in workers}
            # `up --address ... --no-serve`: ingest, the loop, and the control plane in the cluster.
            running = start(s, serve_http=False)
            assert running.control is not None and running.controller is None
            replay(events[:6000], kafka, topics.events)
            _wait_rows(running, 6000)
            first = running.loop.run_once()
            assert first is not None and first.version == 1 and first.promoted
            rec = running.loop.state()["rounds"][-1]
            assert rec["node"] in worker_ids and rec["node"] != head_id  # ran on a worker node
            assert rec["segments"] >= 1  # the driver handed over segment names, not rows
            # The long-lived run stays up between rounds: its workers on worker nodes only, its
            # feeder (the rounds' meeting point) on the head, out of a lost node's way.
            assert running.loop.session is not None and running.loop.session.running
            session_workers = train_worker_nodes()
            assert session_workers and session_workers <= worker_ids, session_workers
            assert _actor_nodes("RoundFeeder") == {head_id}

            # The Serve app, deployed on its own by another process, serves the champion ...
            cluster.serve_deploy(port, serve_env(s, tmp_path))
            history = json.loads((running.registry.path(1) / "vocab.json").read_text())["items"][:5]
            with LiveClient(url, history) as client:
                client.wait_for(1, timeout=180)
                # ... from worker nodes only; the control plane runs on the head.
                assert _actor_nodes("RecommenderDeployment") <= worker_ids
                assert _actor_nodes("RolloutService") == {head_id}
                assert _actor_nodes("ServingContext") == {head_id}
                # A known user is answered from the live history (the app finds the history
                # actor by its namespace, though another job deployed it).
                # (Within a bound: the history actor's own consumer may still be joining its
                # group when the app is first up; it answered from popularity then.)
                known = {"user_id": events[0].user_id, "k": 5}
                deadline = time.monotonic() + 90
                while True:
                    answer = httpx.post(f"{url}/recommend", json=known, timeout=15).json()
                    if answer["source"] == "history" or time.monotonic() > deadline:
                        break
                    time.sleep(1)
                assert answer["source"] == "history" and answer["history_len"] > 0, (
                    answer, _history_state(known["user_id"])
                )  # fmt: skip

                # A second round; a worker node hosting a training worker is lost mid-round.
                replay(events[6000:], kafka, topics.events)
                _wait_rows(running, 9000)
                out: dict[str, object] = {}
                ray_store = (f"{prefix}/ray", s.trainer.storage)
                before = checkpointed(*ray_store)  # the run's checkpoint: the first round's
                runner = threading.Thread(target=lambda: out.update(r=running.loop.run_once()))
                runner.start()
                # Killed once the round has a checkpoint (of its first epoch), so the recovery
                # can show that it resumed from it rather than starting over.
                moved_on = lambda: bool(checkpointed(*ray_store) - before)  # noqa: E731
                victim = _pick_victim(workers, runner, moved_on)
                killed_id = victim.node_id()
                task_lost = killed_id in _round_task_nodes()  # the round's task went with it
                ended = cluster.kill(victim)
                print(f"node-kill ended: {sorted(set(ended))}")
                assert "raylet" in ended  # the node's processes, not only its `ray start`
                runner.join(timeout=900)
                assert not runner.is_alive(), "the round did not finish after the node was lost"
                dead = {n["NodeID"] for n in ray.nodes() if not n["Alive"]}
                assert killed_id in dead  # the fault happened: Ray declares that node dead
                second = out.get("r")
                assert second is not None, f"not registered: {running.loop.last_skip}"
                fresh = Registry(f"{prefix}/registry", storage=s.registry.storage)
                assert fresh.versions() == [1, 2]  # exactly one version per slice
                assert fresh.meta(2)["watermark"] == running.buffer.watermark()
                assert running.loop.state()["rounds"][-1]["node"] != killed_id
                assert fresh.champion() == 2
                resumed = fresh.meta(2)["metrics"]["train_start_epoch"]
                assert resumed >= 1, f"the retried round started over at epoch {resumed}"
                # Resumed by the same long-lived run (restarted workers), not a run of its own.
                runs = {c.split("/")[0] for c in checkpointed(*ray_store)}
                assert len(runs) == 1 and running.loop.session.running, runs
                print(f"node-kill: round 2 resumed at epoch {resumed}; task lost: {task_lost}")
                # The second promotion reaches the app's replicas (one moved off the lost node).
                client.wait_for(2, timeout=180)
                # A version that fails live: the controller rolls the app back to v2.
                # (Rollouts are judged from the replicas' reports: the first 500s are its.)
                bad = register_broken_copy(running.registry, 2)
                bad_at = time.time()
                running.registry.set_champion(bad, "looks fine offline")
                _wait_champion(running.registry, 2, timeout=180)
                client.wait_for(2, timeout=120)
            last = running.registry.decisions()[-1]
            assert last["decision"] == "rollback" and last["version"] == bad, last
            assert "error rate" in last["reason"] or "failed to load" in last["reason"], last
            assert any(st == 500 for _, st, _ in client.results)  # the bad version did fail
            # v2's rollout (from its commit until the bad version) failed no request. (Not the
            # node kill before it: a replica on the lost node may fail what it was answering.)
            v2_at = min(d["ts"] for d in running.registry.decisions() if d["version"] == 2)
            during = [st for t, st, _ in client.results if v2_at <= t < bad_at]
            assert during and client.failed(v2_at, bad_at) == 0, set(during)

            # The control plane survives its process: Ray restarts the actor, state from S3.
            ray.kill(running.control, no_restart=False)
            status = _status_after_restart(running.control)
            assert status["serving"] == 2 and status["champion"] == 2
        finally:
            if running is not None:
                running.stop(timeout=20)
            ray.shutdown()
    shutil.rmtree(root, ignore_errors=True)


def _pick_victim(workers: list[Node], runner: threading.Thread, ready: Callable[[], bool]) -> Node:
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and runner.is_alive():
        hosting = train_worker_nodes()
        if hosting and ready():
            # Prefer a node that hosts a training worker but not the round's task.
            spare = hosting - _round_task_nodes()
            pick = next(iter(spare or hosting))
            victim = next((w for w in workers if w.node_id() == pick), None)
            if victim is not None:
                return victim
        time.sleep(0.3)
    raise AssertionError("the round never trained on a worker node with a checkpoint written")


def _wait_champion(reg: Registry, version: int, timeout: float) -> None:
    deadline = time.time() + timeout
    while reg.champion() != version:
        assert time.time() < deadline, f"champion stayed v{reg.champion()}: {reg.decisions()[-2:]}"
        time.sleep(0.5)


def _status_after_restart(handle: Any, timeout: float = 120) -> dict[str, object]:
    deadline = time.time() + timeout
    while True:
        try:
            status: dict[str, object] = ray.get(handle.status.remote(), timeout=30)
            return status
        except ray.exceptions.RayError:
            assert time.time() < deadline, "the rollout actor did not come back"
            time.sleep(1)
