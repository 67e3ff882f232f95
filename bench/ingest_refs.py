"""The two references ingest is measured against, on the same topic and broker.

(1) a bare kafka-python poll loop that only touches each record (the client's ceiling), (2) Kafka's
own JVM consumer (ConsumerPerformance).
"""

from __future__ import annotations

import subprocess
import time

from kafka import KafkaConsumer, TopicPartition

from streams.broker import java_cmd
from streams.config import BrokerConfig, KafkaConfig


def bare_poll(kafka: KafkaConfig, topic: str, partitions: int, n: int) -> float:
    """events/s of a kafka-python loop that polls and touches each value, nothing else."""
    consumer = KafkaConsumer(
        **kafka.client_kwargs(),
        group_id=None,
        enable_auto_commit=False,
        max_poll_records=5000,
        max_partition_fetch_bytes=8 << 20,
        fetch_max_bytes=64 << 20,
    )
    tps = [TopicPartition(topic, p) for p in range(partitions)]
    consumer.assign(tps)
    consumer.seek_to_beginning(*tps)
    seen = 0
    nbytes = 0
    t0 = None
    while seen < n:
        for msgs in consumer.poll(timeout_ms=1000).values():
            if t0 is None:  # from the first record, as for ingest (no group join in either)
                t0 = time.monotonic()
            for m in msgs:
                nbytes += len(m.value)
            seen += len(msgs)
    dt = time.monotonic() - (t0 or 0.0)
    consumer.close()
    return seen / dt


def jvm_perf(broker: BrokerConfig, topic: str, n: int) -> float:
    """events/s of Kafka's own ConsumerPerformance tool on the same topic."""
    cmd = java_cmd(
        broker, "org.apache.kafka.tools.ConsumerPerformance",
        "--bootstrap-server", broker.bootstrap, "--topic", topic, "--messages", str(n),
        "--group", f"perf-{time.time_ns()}", "--timeout", "60000",
        heap="512m",
    )  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    # Header then one CSV row: start.time, end.time, MB, MB.sec, nMsg, nMsg.sec, ...
    header, row = next(
        (lines[i], lines[i + 1])
        for lines in [out.strip().splitlines()]
        for i in range(len(lines) - 1)
        if "nMsg.sec" in lines[i]
    )
    cols = [c.strip() for c in header.split(",")]
    vals = [v.strip() for v in row.split(",")]
    return float(vals[cols.index("nMsg.sec")])
