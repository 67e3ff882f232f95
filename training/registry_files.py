"""A registry version's files: their hashes, the finite-weights check, and the verified local copy
of a version kept on an object store.

Part of the registry (``training.registry`` documents where files live; this module only checks
and copies what it is handed). Weights are safetensors: nothing here unpickles.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from safetensors import safe_open

from streams.storage import Storage
from training.errors import NonFiniteWeightsError, RegistryIntegrityError
from training.registry_log import VersionRecord

WEIGHTS = "model.safetensors"
META = "meta.json"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fsync_file(path: Path) -> None:
    with path.open("rb") as fh:
        os.fsync(fh.fileno())


def mismatch(version: int, name: str, actual: str, digest: str) -> RegistryIntegrityError:
    return RegistryIntegrityError(
        f"version {version}: {name} has sha256 {actual[:12]}…, expected {digest[:12]}… "
        "(truncated or tampered); restore it or delete the version"
    )


def cache_root() -> Path:
    """Where object-store versions are cached locally (``$STREAMTUNE_CACHE`` overrides)."""
    base = os.environ.get("STREAMTUNE_CACHE")
    return (Path(base) if base else Path.home() / ".cache" / "streamtune") / "registry"


def check_finite(weights: Path) -> None:
    """Raise NonFiniteWeightsError if any floating tensor of a safetensors file has NaN/inf."""
    import torch  # imported here: reading the registry (CLI, serving context) needs no torch

    with safe_open(str(weights), framework="pt") as f:
        for name in f.keys():  # noqa: SIM118 - safe_open is not a mapping
            t = f.get_tensor(name)
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                bad = int((~torch.isfinite(t)).sum())
                raise NonFiniteWeightsError(
                    f"{weights.name}: tensor {name!r} has {bad} NaN/inf values; a model with "
                    "non-finite weights is never registered"
                )


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_verified(storage: Storage, key: str, version: int, name: str, digest: str) -> bytes:
    """The bytes at ``key``, checked against ``digest`` (the hash recorded for ``name``)."""
    try:
        data = storage.read(key)
    except FileNotFoundError:
        raise RegistryIntegrityError(
            f"version {version}: {name} is missing from {storage.uri}/{key.rpartition('/')[0]}"
        ) from None
    actual = hashlib.sha256(data).hexdigest()
    if actual != digest:
        raise mismatch(version, name, actual, digest)
    return data


def fetch_verified(storage: Storage, rec: VersionRecord, staging: Path) -> None:
    """Download the version's own files of ``rec`` into ``staging``, each checked against its
    recorded hash (the files it shares with other versions are ``registry_shared``'s)."""
    for name, digest in sorted(rec.files.items()):
        if "/" in name:
            continue
        data = read_verified(storage, f"{rec.prefix}/{name}", rec.version, name, digest)
        (staging / name).write_bytes(data)


def install(staging: Path, dest: Path) -> None:
    """Rename a complete, verified copy into place; a copy another process installed first wins
    (versions are immutable, so both are the same)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.rename(staging, dest)
    except OSError:
        if not dest.is_dir():
            raise


def verify_dir(rec: VersionRecord, d: Path) -> dict[str, Any]:
    """Re-hash every file of ``rec`` in ``d`` and check that meta.json lists the same hashes as the
    log; returns meta.json. RegistryIntegrityError if anything is off."""
    for name, digest in rec.files.items():
        f = d / name
        if not f.exists():
            raise RegistryIntegrityError(f"version {rec.version}: {name} is missing")
        actual = sha256_file(f)
        if actual != digest:
            raise mismatch(rec.version, name, actual, digest)
    try:
        meta: dict[str, Any] = json.loads((d / META).read_text())
    except (FileNotFoundError, json.JSONDecodeError) as err:
        raise RegistryIntegrityError(
            f"version {rec.version}: unreadable meta.json ({err})"
        ) from None
    for name, digest in meta["files"].items():
        if rec.files.get(name) != digest:
            raise RegistryIntegrityError(
                f"version {rec.version}: meta.json lists {name} with sha256 {digest[:12]}…, "
                "the registry's log does not (tampered); restore it or delete the version"
            )
    return meta
