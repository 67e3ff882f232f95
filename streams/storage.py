"""Where durable state lives: a local directory or an object-store prefix, behind one interface.

The buffer and the registry keep their state as whole objects that are written once and never
modified in place, and make them visible through a commit log (``streams.commitlog``) whose next
entry can be created by exactly one writer. So a store needs only five operations: read a whole
object, write one (all or nothing), *create* one only if its key is free, list a prefix and delete.
Object stores give all five natively (``create`` is a PUT with ``If-None-Match: *``); a local
directory gives them with a fsynced temp file and ``link``/``rename``.

Locations are plain paths (``state/buffer``) or URIs: ``file://``, ``s3://bucket/prefix``,
``gs://bucket/prefix`` and ``az://account/container/prefix`` (``abfs[s]://`` too). Credentials
come from the environment the way each ecosystem expects (``AWS_ACCESS_KEY_ID``,
``AWS_ENDPOINT_URL``, ``GOOGLE_APPLICATION_CREDENTIALS``, ``AZURE_STORAGE_*``), or from
``StorageConfig.options`` (object_store's option names) where the environment cannot carry them,
e.g. into Ray workers on other nodes.
"""

from __future__ import annotations

import os
import uuid
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Annotated, Any, NamedTuple
from urllib.parse import urlparse

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from streams.errors import StorageError

REMOTE_SCHEMES = ("s3", "s3a", "gs", "az", "abfs", "abfss", "adl", "azure")


def _as_location(v: object) -> object:
    # A URI must stay a string: Path("s3://b/k") would collapse the "//".
    return v if isinstance(v, str) and is_remote(v) else Path(str(v))


# A config field naming where state lives: a local Path, or an object-store URI kept as a string.
Location = Annotated[Path | str, BeforeValidator(_as_location)]


class StorageConfig(BaseModel):
    """How to reach object storage; unused for local paths."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    options: dict[str, str] = Field(
        default={},
        description=(
            "object_store options for s3/gs/az locations (e.g. endpoint, region, allow_http, "
            "access_key_id); anything not given is read from the standard environment variables."
        ),
    )


class ObjectInfo(NamedTuple):
    key: str  # relative to the storage's root
    size: int


class Storage(ABC):
    """A flat key space under one root. Keys use '/' separators and never start with one."""

    uri: str

    @abstractmethod
    def read(self, key: str) -> bytes:
        """The whole object; ``FileNotFoundError`` if there is none."""

    @abstractmethod
    def write(self, key: str, data: bytes) -> None:
        """Store ``data`` at ``key``, replacing what was there; readers see old or new, whole."""

    @abstractmethod
    def create(self, key: str, data: bytes) -> bool:
        """Store ``data`` only if ``key`` is free; False if an object is already there.

        Of any number of concurrent writers to one key, exactly one gets True.
        """

    @abstractmethod
    def list(self, prefix: str = "") -> list[ObjectInfo]:
        """Objects directly in ``prefix``'s folder whose name starts with its last part, sorted.

        Not recursive: ``list("_log/")`` is the log's objects, ``list("seg-")`` the root's
        segments.
        """

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove ``key``; no error if it is already gone."""

    @property
    def local_root(self) -> Path | None:
        """The directory behind a local storage (None for object stores)."""
        return None

    def exists(self, key: str) -> bool:
        try:
            self.read(key)
        except FileNotFoundError:
            return False
        return True


class LocalStorage(Storage):
    """A directory; every write is fsynced and made visible by an atomic rename or link."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)
        self.uri = str(root)

    @property
    def local_root(self) -> Path:
        return self.root

    def read(self, key: str) -> bytes:
        return (self.root / key).read_bytes()

    def _stage(self, path: Path, data: bytes) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".tmp-{path.name}-{uuid.uuid4().hex[:8]}")
        try:
            with tmp.open("wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return tmp

    def write(self, key: str, data: bytes) -> None:
        path = self.root / key
        tmp = self._stage(path, data)
        try:
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        fsync_dir(path.parent)

    def create(self, key: str, data: bytes) -> bool:
        path = self.root / key
        tmp = self._stage(path, data)
        try:
            os.link(tmp, path)  # atomic and exclusive: fails if the name exists
        except FileExistsError:
            return False
        finally:
            tmp.unlink(missing_ok=True)
        fsync_dir(path.parent)
        return True

    def list(self, prefix: str = "") -> list[ObjectInfo]:
        base, _, stem = prefix.rpartition("/")
        folder = self.root / base if base else self.root
        if not folder.is_dir():
            return []
        out = []
        for p in folder.iterdir():
            if p.name.startswith(".tmp-") or not p.name.startswith(stem) or not p.is_file():
                continue
            try:
                out.append(ObjectInfo(f"{base}/{p.name}" if base else p.name, p.stat().st_size))
            except FileNotFoundError:  # deleted while we listed
                continue
        return sorted(out)

    def delete(self, key: str) -> None:
        (self.root / key).unlink(missing_ok=True)


class ObjectStorage(Storage):
    """An s3/gs/az bucket prefix through obstore (Rust object_store): conditional puts included."""

    def __init__(self, uri: str, cfg: StorageConfig | None = None) -> None:
        import obstore
        from obstore.store import from_url

        self.uri = uri.rstrip("/")
        self._cfg = cfg
        self._obs = obstore
        options: Any = dict((cfg or StorageConfig()).options)
        client: Any = {}
        if str(options.get("allow_http", "")).lower() in ("1", "true", "yes"):
            client["allow_http"] = True
            options.pop("allow_http")
        try:
            self._store = from_url(self.uri, config=options or None, client_options=client or None)
        except Exception as err:  # obstore raises its own config/parse errors
            raise StorageError(f"cannot open {self.uri}: {err}") from err

    def __reduce__(self) -> tuple[type[ObjectStorage], tuple[str, StorageConfig | None]]:
        # Shipped to Ray tasks and workers by location and options; they open their own client.
        return (ObjectStorage, (self.uri, self._cfg))

    def read(self, key: str) -> bytes:
        try:
            return bytes(self._obs.get(self._store, key).bytes())
        except FileNotFoundError:  # obstore's NotFoundError is one; its text is a page long
            raise FileNotFoundError(f"{self.uri}/{key}") from None
        except self._obs.exceptions.BaseError as err:
            raise StorageError(f"cannot read {self.uri}/{key}: {err}") from err

    def write(self, key: str, data: bytes) -> None:
        try:
            self._obs.put(self._store, key, data, use_multipart=False)
        except self._obs.exceptions.BaseError as err:
            raise StorageError(f"cannot write {self.uri}/{key}: {err}") from err

    def create(self, key: str, data: bytes) -> bool:
        try:
            self._obs.put(self._store, key, data, mode="create", use_multipart=False)
        except (self._obs.exceptions.AlreadyExistsError, self._obs.exceptions.PreconditionError):
            return False
        except FileExistsError:
            return False
        except self._obs.exceptions.BaseError as err:
            raise StorageError(f"cannot create {self.uri}/{key}: {err}") from err
        return True

    def list(self, prefix: str = "") -> list[ObjectInfo]:
        base, _, stem = prefix.rpartition("/")
        try:
            page = self._obs.list_with_delimiter(self._store, base or None)
        except self._obs.exceptions.BaseError as err:
            raise StorageError(f"cannot list {self.uri}/{prefix}: {err}") from err
        out = [ObjectInfo(str(m["path"]), int(m["size"])) for m in page["objects"]]
        return sorted(o for o in out if o.key.rpartition("/")[2].startswith(stem))

    def delete(self, key: str) -> None:
        try:
            self._obs.delete(self._store, key)
        except (FileNotFoundError, self._obs.exceptions.NotFoundError):
            return
        except self._obs.exceptions.BaseError as err:
            raise StorageError(f"cannot delete {self.uri}/{key}: {err}") from err


def is_remote(location: str | Path) -> bool:
    return urlparse(str(location)).scheme in REMOTE_SCHEMES


def open_storage(location: str | Path, cfg: StorageConfig | None = None) -> Storage:
    """The storage at a local path, a ``file://`` URI or an s3/gs/az URI."""
    text = str(location)
    scheme = urlparse(text).scheme
    if scheme in ("", "file"):
        return LocalStorage(Path(urlparse(text).path if scheme == "file" else text))
    if scheme in REMOTE_SCHEMES:
        return ObjectStorage(text, cfg)
    raise StorageError(
        f"unsupported storage location {text!r}: use a local path or an s3://, gs:// or az:// "
        "URI (these have the conditional create the commit protocol needs)"
    )


def arrow_filesystem(location: str, cfg: StorageConfig | None = None) -> tuple[Any, str]:
    """A pyarrow filesystem and path for ``location`` (what Ray Train's storage takes).

    s3 options given in ``cfg`` (endpoint, keys, region, allow_http) are translated; anything
    else, and every other scheme, comes from pyarrow's own URI parsing and the environment.
    """
    import pyarrow.fs as pafs

    opts = (cfg or StorageConfig()).options
    parsed = urlparse(location)
    if parsed.scheme in ("s3", "s3a") and opts:
        endpoint = urlparse(opts.get("endpoint", ""))
        fs = pafs.S3FileSystem(
            access_key=opts.get("access_key_id"),
            secret_key=opts.get("secret_access_key"),
            region=opts.get("region", "us-east-1"),
            scheme=endpoint.scheme or "https",
            endpoint_override=endpoint.netloc or None,
        )
        return fs, f"{parsed.netloc}{parsed.path}".rstrip("/")
    fs, path = pafs.FileSystem.from_uri(location)
    return fs, path


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write, fsync, rename, fsync the directory: readers see the old or the new file, whole."""
    LocalStorage(path.parent).write(path.name, data)
