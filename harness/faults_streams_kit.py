"""What the stream faults share: a broker, ingest members, the audit and the table row.

A member runs either on a thread of this process (``Member``) or as a process of its own
(``spawn_member``), which a fault can stop and continue with signals.
"""

from __future__ import annotations

import contextlib
import json
import logging
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from streams.admin import end_offsets, ensure_topics
from streams.broker import LocalBroker, free_port
from streams.buffer import EventBuffer
from streams.config import BrokerConfig, BufferConfig, IngestConfig, KafkaConfig, TopicsConfig
from streams.datasets import DriftSpec, synthetic_drift
from streams.events import Event
from streams.ingest import Ingestor, IngestStats
from streams.segments import Segment

TOPICS = TopicsConfig(events="fault.events", dead_letter="fault.events.dlq", partitions=4)


@contextlib.contextmanager
def broker_in(tmp: Path) -> Iterator[tuple[LocalBroker, KafkaConfig]]:
    cfg = BrokerConfig(
        port=free_port(), controller_port=free_port(), state_dir=tmp / "kafka", heap="512m"
    )
    broker = LocalBroker(cfg)
    broker.up()
    try:
        kafka = KafkaConfig(bootstrap_servers=cfg.bootstrap)
        ensure_topics(kafka, TOPICS)
        yield broker, kafka
    finally:
        broker.down()


def events(n: int, seed: int) -> list[Event]:
    return list(synthetic_drift(DriftSpec(events=n, seed=seed)))


def wait_for(cond: Callable[[], bool], timeout: float, what: str) -> float:
    """Seconds it took for ``cond`` to hold; raises TimeoutError naming ``what``."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if cond():
            return time.monotonic() - t0
        time.sleep(0.1)
    raise TimeoutError(f"{what}: not within {timeout:.0f}s")


def audit(buf: EventBuffer, kafka: KafkaConfig, expected: list[Event]) -> dict[str, Any]:
    """Lost and duplicated events, by event id and by (partition, offset) against Kafka's log."""
    table = EventBuffer(buf.cfg).read(columns=["event_id", "partition", "offset"])
    ids = table["event_id"].to_pylist()
    pos = list(zip(table["partition"].to_pylist(), table["offset"].to_pylist(), strict=True))
    want = {e.event_id for e in expected}
    ends = end_offsets(kafka, TOPICS.events)
    all_pos = {(p, o) for p, n in ends.items() for o in range(n)}
    lost_ids, lost_pos = len(want - set(ids)), len(all_pos - set(pos))
    dup_ids, dup_pos = len(ids) - len(set(ids)), len(pos) - len(set(pos))
    return {
        "lost": max(lost_ids, lost_pos),
        "duplicated": max(dup_ids, dup_pos),
        "by": f"ids lost {lost_ids} dup {dup_ids}; offsets lost {lost_pos} dup {dup_pos}",
        "rows": len(ids),
    }


class Member:
    """An Ingestor on a thread of this process, remembering when each segment landed."""

    def __init__(self, kafka: KafkaConfig, buf: EventBuffer, **cfg: Any) -> None:
        base: dict[str, Any] = dict(
            group_id="fault-ingest", max_poll_records=200, segment_rows=200,
            flush_interval_s=0.2, session_timeout_ms=6000, retry_initial_s=0.2, retry_max_s=1.0,
        )  # fmt: skip
        self.flushes: list[float] = []
        self.error: BaseException | None = None
        self.ingestor = Ingestor(
            kafka, TOPICS, IngestConfig(**{**base, **cfg}), buf, on_flush=self._on_flush
        )
        self.thread = threading.Thread(target=self._run, name="fault-ingest", daemon=True)
        self.thread.start()

    def _on_flush(self, seg: Segment, stats: IngestStats) -> None:
        self.flushes.append(time.monotonic())

    def _run(self) -> None:
        try:
            self.ingestor.run()
        except BaseException as err:  # reported in the row: ingest must not die of the fault
            self.error = err

    @property
    def stats(self) -> IngestStats:
        return self.ingestor.stats

    def first_flush_after(self, t: float) -> float | None:
        return next((f for f in self.flushes if f > t), None)

    def stop(self) -> None:
        self.ingestor.stop()
        self.thread.join(timeout=60)


def caught_up(buf: EventBuffer, n: int) -> Callable[[], bool]:
    return lambda: sum(EventBuffer(buf.cfg).watermark().values()) >= n


def row(fault: str, ok: bool, audit_: dict[str, Any], recover_s: float, detail: str,
        **evidence: Any) -> dict[str, Any]:  # fmt: skip
    survived = ok and audit_["lost"] == 0 and audit_["duplicated"] == 0
    return {
        "fault": fault, "survived": survived, "lost": audit_["lost"],
        "duplicated": audit_["duplicated"], "failed_requests": None,  # no serving here
        "recover_s": round(recover_s, 2), "detail": f"{detail}; {audit_['by']}", **evidence,
    }  # fmt: skip


# -- a member in its own process ------------------------------------------------------------
def spawn_member(
    tmp: Path, tag: str, kafka: KafkaConfig, buf: EventBuffer, **cfg: Any
) -> subprocess.Popen[bytes]:
    """An ingest process (``harness.faults_streams --member``, which runs ``member_main``) that
    writes its stats on exit."""
    spec = {
        "kafka": kafka.model_dump(mode="json"),
        "ingest": {"group_id": "fault-ingest", "max_poll_records": 300, **cfg},
        "buffer": str(buf.root),
        "stats": str(tmp / f"member-{tag}.json"),
    }
    path = tmp / f"member-{tag}.spec.json"
    path.write_text(json.dumps(spec))
    log = (tmp / f"member-{tag}.log").open("wb")
    return subprocess.Popen(
        [sys.executable, "-m", "harness.faults_streams", "--member", str(path)],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip


def member_main(spec_path: Path) -> None:
    """The body of a spawned member: ingest by the spec until stopped or idle."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    spec = json.loads(spec_path.read_text())
    ing = Ingestor(
        KafkaConfig(**spec["kafka"]),
        TOPICS,
        IngestConfig(**spec["ingest"]),
        EventBuffer(BufferConfig(path=Path(spec["buffer"]))),
    )
    signal.signal(signal.SIGTERM, lambda *_: ing.stop())
    stats = ing.run()
    out = {"fenced": stats.fenced, "ingested": stats.ingested, "rewinds": stats.rewinds,
           "last_error": stats.last_error}  # fmt: skip
    Path(spec["stats"]).write_text(json.dumps(out))
