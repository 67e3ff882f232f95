"""The deployment version Serve compares on a redeploy: the serving code and the settings a
replica uses, so a new ``user_config`` alone is an in-place update and a changed key or limit
restarts the replicas."""

from __future__ import annotations

import functools
from pathlib import Path

from serving.config import ServingConfig


def code_version() -> str:
    import hashlib

    import serving
    import training.model
    import training.serving_forward

    # Every module a replica runs: a change to any of them is new replica code.
    files = sorted(Path(str(serving.__file__)).parent.glob("*.py"))
    files += [Path(str(m.__file__)) for m in (training.model, training.serving_forward)]
    h = hashlib.sha256()
    for f in files:
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def settings_digest(cfg: ServingConfig) -> str:
    """A short digest of the settings a replica uses; the key only through a slow, salted hash
    (the version is visible in `serve status`, so a fast hash would invite guessing). Replica
    counts and the like are deployment options Serve compares itself: left out."""
    import hashlib

    plain = cfg.model_dump_json(
        include={"max_k", "max_history", "max_body_bytes", "batch_max_size", "batch_wait_s"}
    ).encode()
    key = cfg.api_key.get_secret_value().encode() if cfg.api_key is not None else b""
    return hashlib.sha256(plain + _slow_hash(key)).hexdigest()[:12]


@functools.lru_cache(maxsize=4)  # each rollout rebuilds the app; scrypt once per key
def _slow_hash(key: bytes) -> bytes:
    import hashlib

    return hashlib.scrypt(key, salt=b"streamtune-serve-version", n=2**14, r=8, p=1)
