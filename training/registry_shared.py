"""Files a registry version shares with other versions: immutable, named by their content.

Part of the registry (``training.registry`` documents where files live). A version's files may
include ``shared/<sha256><suffix>`` files: written once by one version, then carried by later
versions without writing their bytes again (the per-user history index's parts,
``training.histories``). A version never depends on another version's directory, so pruning one
never breaks another:

- locally, each version's directory holds its own hard link of every shared file it uses; a file
  lives while any version links it, so pruning (deleting a directory) needs no bookkeeping;
- on an object store the bytes are stored once under ``blobs/``, a version's record lists the
  shared files it uses, and a blob goes once no live version or pending upload lists it
  (``collect``); the local cache keeps one verified copy per blob, linked into each version's
  cached directory.

A writer adds a file with ``share`` and carries one of its base version's with ``link``; the
registry hashes only the shared files its base version does not already list (``digests``).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Iterable
from pathlib import Path

from streams.storage import Storage
from training.errors import RegistryError
from training.registry_files import read_verified, sha256_file
from training.registry_log import RegistryState

log = logging.getLogger(__name__)

SHARED = "shared"
BLOBS = "blobs"


def is_shared(name: str) -> bool:
    return name.startswith(f"{SHARED}/")


def _digest(name: str) -> str:
    return name.rpartition("/")[2].split(".", 1)[0]


def share(path: Path, directory: Path) -> str:
    """Move a finished file into ``directory``'s shared files, named by its content; returns
    its name relative to ``directory`` (what a later version passes to ``link``)."""
    name = f"{SHARED}/{sha256_file(path)}{''.join(path.suffixes)}"
    (directory / SHARED).mkdir(exist_ok=True)
    os.replace(path, directory / name)
    return name


def link(src_dir: Path, name: str, dst_dir: Path) -> None:
    """Make ``src_dir``'s shared file ``name`` one of ``dst_dir``'s: a hard link (no bytes
    written), or a copy on a file system without links."""
    dest = dst_dir / name
    dest.parent.mkdir(exist_ok=True)
    if dest.exists():
        return
    try:
        os.link(src_dir / name, dest)
    except OSError:
        shutil.copyfile(src_dir / name, dest)


def files(directory: Path) -> list[str]:
    """A version's file names: its top-level files and its shared files."""
    out = [p.name for p in directory.iterdir() if p.is_file()]
    if (directory / SHARED).is_dir():
        out += [f"{SHARED}/{p.name}" for p in (directory / SHARED).iterdir() if p.is_file()]
    return sorted(out)


def digests(directory: Path, names: Iterable[str], inherited: dict[str, str]) -> dict[str, str]:
    """sha256 of each file. A shared file is named by its hash: it is hashed (and checked against
    its name) unless ``inherited`` (the base version's files) lists it, since that copy was
    checked when the base was written; so carrying a large shared file costs nothing."""
    out: dict[str, str] = {}
    for name in names:
        if not is_shared(name):
            out[name] = sha256_file(directory / name)
            continue
        want = _digest(name)
        if inherited.get(name) != want:
            actual = sha256_file(directory / name)
            if actual != want:
                raise RegistryError(f"shared file {name} has sha256 {actual}, not its name's")
        out[name] = want
    return out


def marker(writer: str, names: Iterable[str]) -> bytes:
    """An upload's marker: who writes it and the shared files it uses (kept from ``collect``
    until the upload is committed or removed)."""
    used = sorted(n for n in names if is_shared(n))
    return json.dumps({"writer": writer, "shared": used}).encode()


def upload(
    storage: Storage, staging: Path, names: Iterable[str], inherited: dict[str, str]
) -> None:
    """Put the shared files the base version does not list under ``blobs/`` (after the marker:
    a blob is never visible before a marker or version naming it)."""
    for name in names:
        if is_shared(name) and name not in inherited:
            storage.write(f"{BLOBS}/{name.rpartition('/')[2]}", (staging / name).read_bytes())


def fetch(storage: Storage, version: int, name: str, digest: str, cache: Path, dest: Path) -> None:
    """Link the verified cached copy of a shared file into ``dest`` (downloaded once)."""
    blob = cache / BLOBS / name.rpartition("/")[2]
    if not blob.exists():
        data = read_verified(storage, f"{BLOBS}/{blob.name}", version, name, digest)
        blob.parent.mkdir(parents=True, exist_ok=True)
        tmp = blob.with_name(f".tmp-{blob.name}-{os.getpid()}")
        tmp.write_bytes(data)
        os.replace(tmp, blob)  # another process's identical copy may win: same bytes
    link(blob.parent, blob.name, dest / SHARED)


def keep_cached(cache: Path, staging: Path, names: Iterable[str]) -> None:
    """A writer's new shared files become the cache's copies (a later read downloads nothing)."""
    for name in names:
        if is_shared(name):
            link(staging / SHARED, name.rpartition("/")[2], cache / BLOBS)


def collect(storage: Storage, state: RegistryState, uploads: str, cache: Path | None) -> list[str]:
    """Delete the blobs no live version and no pending upload lists; returns their names.

    Blobs are listed before the markers are read, and a writer writes its marker before its
    blobs: a blob seen here either belongs to a marker read below or to a committed version.
    """
    blobs = storage.list(f"{BLOBS}/")
    if not blobs:
        return []
    used = {n.rpartition("/")[2] for r in state.versions.values() for n in r.files if is_shared(n)}
    live = {r.prefix.rpartition("/")[2] for r in state.versions.values()}
    for m in storage.list(f"{uploads}/"):
        key = m.key.rpartition("/")[2]
        if key in live:
            continue
        try:
            names = json.loads(storage.read(m.key)).get("shared", [])
        except FileNotFoundError:
            continue  # committed and pruned, or removed, since it was listed
        except (ValueError, AttributeError):
            names = []  # a marker written before shared files existed
        used |= {n.rpartition("/")[2] for n in names}
    gone = [b.key.rpartition("/")[2] for b in blobs if b.key.rpartition("/")[2] not in used]
    for name in gone:
        storage.delete(f"{BLOBS}/{name}")
        if cache is not None:
            (cache / BLOBS / name).unlink(missing_ok=True)
    if gone:
        log.info("registry %s: deleted %d unused shared files", storage.uri, len(gone))
    return gone
