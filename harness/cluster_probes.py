"""What the cluster test and ``bench.cluster`` ask the connected cluster and its storage:
where training workers run, and which checkpoints Ray Train has registered."""

from __future__ import annotations

import json

from streams.storage import StorageConfig, arrow_filesystem


def state_address() -> str:
    """The connected cluster's address for Ray's state API, which without one guesses among the
    Ray instances on the machine (and fails when others run there too)."""
    import ray

    return str(ray.get_runtime_context().gcs_address)


def train_worker_nodes() -> set[str]:
    """Ids of the nodes that host a live Ray Train worker."""
    from ray.util.state import list_actors

    alive = list_actors(state_address(), filters=[("state", "=", "ALIVE")], limit=1000)
    return {a.node_id for a in alive if a.node_id and "RayTrainWorker" in (a.class_name or "")}


def checkpointed(location: str, cfg: StorageConfig) -> set[str]:
    """``run/round`` of the checkpoint each run under Ray Train's storage URI has registered.

    Registered, not just uploaded: a worker killed between its upload and the controller's
    bookkeeping leaves a checkpoint that no retry resumes from. A new entry appears when a new
    run (a round's own) registers its first checkpoint or a long-lived run's checkpoint moves on
    to another round (its progress names the round).
    """
    import pyarrow.fs as pafs

    fs, path = arrow_filesystem(location, cfg)
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    out: set[str] = set()
    for info in infos:
        if info.base_name != "checkpoint_manager_snapshot.json":
            continue
        run_dir = info.path.rsplit("/", 1)[0]
        run = run_dir.rsplit("/", 1)[-1]
        try:
            with fs.open_input_stream(info.path) as f:
                latest = json.loads(f.read()).get("latest_checkpoint_result")
            if latest is None:
                continue
            progress = f"{run_dir}/{latest['checkpoint_dir_name']}/progress.json"
            with fs.open_input_stream(progress) as f:
                out.add(f"{run}/{json.loads(f.read()).get('round')}")
        except (OSError, ValueError, KeyError):
            continue  # being rewritten (not atomic on every store), or pruned meanwhile
    return out
