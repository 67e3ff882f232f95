"""The storage contract every location must keep: a local directory and a real S3 server alike."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from pydantic import BaseModel

from streams.commitlog import CommitLog
from streams.storage import LocalStorage, Storage, StorageConfig, open_storage


@pytest.fixture(params=["local", "s3"])
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> Storage:
    if request.param == "local":
        return open_storage(tmp_path / "store")
    uri, cfg = request.getfixturevalue("s3_location")
    return open_storage(uri, cfg)


def test_read_write_list_delete(storage: Storage) -> None:
    storage.write("seg-2", b"bb")
    storage.write("seg-1", b"a")
    storage.write("other", b"zzz")
    storage.write("_log/0.json", b"{}")
    assert storage.read("seg-1") == b"a"
    assert [(o.key, o.size) for o in storage.list("seg-")] == [("seg-1", 1), ("seg-2", 2)]
    assert [o.key for o in storage.list("_log/")] == ["_log/0.json"]
    storage.write("seg-1", b"replaced")
    assert storage.read("seg-1") == b"replaced"
    storage.delete("seg-1")
    storage.delete("seg-1")  # deleting twice is fine
    with pytest.raises(FileNotFoundError, match="seg-1"):
        storage.read("seg-1")
    assert not storage.exists("seg-1") and storage.exists("seg-2")


def test_create_has_exactly_one_winner(storage: Storage) -> None:
    wins: list[int] = []
    barrier = threading.Barrier(8)

    def racer(i: int) -> None:
        barrier.wait()
        if storage.create("race/key", str(i).encode()):
            wins.append(i)

    threads = [threading.Thread(target=racer, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(wins) == 1
    assert storage.read("race/key") == str(wins[0]).encode()  # the winner's bytes, not a loser's
    assert storage.create("race/key", b"late") is False


class _Count(BaseModel):
    total: int = 0
    writers: list[str] = []


class _Add(BaseModel):
    n: int
    writer: str


def _apply(state: _Count, e: _Add) -> _Count:
    return _Count(total=state.total + e.n, writers=[*state.writers, e.writer])


def test_commit_log_serialises_concurrent_writers(storage: Storage) -> None:
    # Four writers with their own logs (as separate processes would have) each add 1, 10 times.
    logs = [CommitLog(storage, "_log", _Count, _Add, _apply, checkpoint_every=7) for _ in range(4)]

    def writer(i: int) -> None:
        for _ in range(10):
            logs[i].append(lambda st, i=i: _Add(n=1, writer=f"w{i}"))

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    fresh = CommitLog(storage, "_log", _Count, _Add, _apply, checkpoint_every=7)
    state = fresh.refresh()
    assert state.total == 40 and fresh.next_entry == 40  # no entry lost, none written twice
    assert sorted(set(state.writers)) == ["w0", "w1", "w2", "w3"]
    # A cold reader starts from the newest checkpoint, not entry 0, and agrees.
    assert storage.exists("_log/_latest")
    assert all(log.refresh() == state for log in logs)


def test_unsupported_location_says_what_to_use() -> None:
    from streams.errors import StorageError

    with pytest.raises(StorageError, match="s3://"):
        open_storage("ftp://host/x")
    assert isinstance(open_storage("file:///tmp/streamtune-test-store"), LocalStorage)
    assert StorageConfig().options == {}


def test_one_log_shared_by_threads_never_skips_an_entry(storage: Storage) -> None:
    # ingest, the loop and the gauges share one buffer (one log object) across threads: two
    # refreshes folding the same entry at once must not skip the next one.
    shared = CommitLog(storage, "_log", _Count, _Add, _apply)
    writer = CommitLog(storage, "_log", _Count, _Add, _apply)
    done = threading.Event()

    def read() -> None:
        while not done.is_set():
            shared.refresh()

    readers = [threading.Thread(target=read) for _ in range(4)]
    for t in readers:
        t.start()
    for _ in range(150):
        writer.append(lambda st: _Add(n=1, writer="w"))
    done.set()
    for t in readers:
        t.join()
    state = shared.refresh()
    assert state.total == 150 and shared.next_entry == 150
