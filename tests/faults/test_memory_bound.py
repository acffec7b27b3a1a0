"""A time-series worker fed an adversarial stream keeps its memory within the documented bound (docs/memory.md).

Every observation opens a new series with an id just under ``timeseries.max_id_bytes`` and a
~200 KB value (padded metadata), so no window ever completes and, without a bound in bytes, the
worker would hold all of it (``max_series`` counts series, not their size). Some observations carry
a ~1 MB series id and must be dead-lettered ``oversize_id`` before anything is held. The worker runs
as a process on the real broker and Triton; its peak RSS (VmHWM) above its RSS once ready must
stay under the bound docs/memory.md documents.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from embedstream.config import Settings, load_settings
from embedstream.consume.deadletter import REASON
from embedstream.local.stack.stack import LocalStack
from embedstream.local.stack.worker_process import WorkerProcess

from ..integration.helpers import produce

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MiB = 1 << 20
STATE_BYTES = 32 * MiB
VALUE_PAD = 200_000
BIG_SERIES = 1200  # x ~200 KB: ~230 MiB of observations, each a new series
HUGE_IDS = 10  # x ~1 MB series ids


def rss_bound(settings: Settings) -> int:
    """docs/memory.md: max_state_bytes + 2 x kafka.fetch_max_bytes + the producer's 32 MiB buffer + 64 MiB."""
    return settings.timeseries.max_state_bytes + 2 * settings.kafka.fetch_max_bytes + 32 * MiB + 64 * MiB


def vm(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no {field} for {pid}")


@pytest.fixture(scope="module")
def ts_stack(tmp_path_factory) -> Iterator[LocalStack]:
    settings = load_settings(
        encoder={"family": "lstm", "arch": "w4c3h6", "weights": "random", "max_batch_size": 32},
        kafka={
            "input_topic": "mem-in",
            "output_topic": "mem-out",
            "dead_letter_topic": "mem-dlq",
            "group_id": "mem",
            # Smaller fetches than the defaults (50 / 10 MiB), so the bound is tight enough that holding
            # what was offered would break it.
            "fetch_max_bytes": 8 * MiB,
            "max_partition_fetch_bytes": 2 * MiB,
        },
        timeseries={"max_state_bytes": STATE_BYTES, "max_series": 1_000_000},
    )
    with LocalStack(settings, workdir=tmp_path_factory.mktemp("memory"), partitions=2) as running:
        yield running


def adversarial() -> list[tuple[bytes, bytes]]:
    out = []
    pad = "p" * VALUE_PAD
    for i in range(BIG_SERIES):
        sid = f"s{i:06d}-" + "x" * 1000  # 1008 bytes: under the 1 KiB cap
        doc = {"series_id": sid, "timestamp_ms": 1_000 + i, "values": [1.0, 2.0, 3.0], "metadata": {"pad": pad}}
        out.append((f"k{i}".encode(), orjson.dumps(doc)))
        if i % (BIG_SERIES // HUGE_IDS) == 0:
            huge = {"series_id": f"h{i}-" + "y" * 1_000_000, "timestamp_ms": 1_000 + i, "values": [1.0, 2.0, 3.0]}
            out.append((f"h{i}".encode(), orjson.dumps(huge)))
    return out


def dead_letter_reasons(settings: Settings, expected: int, timeout_s: float) -> Counter[str]:
    from kafka import KafkaConsumer

    consumer = KafkaConsumer(
        settings.kafka.dead_letter_topic,
        bootstrap_servers=settings.kafka.bootstrap_servers,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        consumer_timeout_ms=2000,
        fetch_max_bytes=64 * MiB,
        max_partition_fetch_bytes=16 * MiB,
    )
    reasons: Counter[str] = Counter()
    deadline = time.monotonic() + timeout_s
    try:
        while sum(reasons.values()) < expected and time.monotonic() < deadline:
            for batch in consumer.poll(timeout_ms=500).values():
                for rec in batch:
                    reasons[dict(rec.headers)[REASON].decode()] += 1
    finally:
        consumer.close()
    return reasons


def test_adversarial_series_stay_within_the_documented_memory_bound(ts_stack, tmp_path):
    settings = ts_stack.settings
    messages = adversarial()
    offered = sum(len(v) for _, v in messages)
    worker = WorkerProcess(settings, tmp_path, "w-mem").start().wait_ready()
    try:
        baseline = vm(worker.pid, "VmRSS")
        produce(settings.kafka.bootstrap_servers, settings.kafka.input_topic, messages)
        deadline = time.monotonic() + 180
        while (worker.status() or {}).get("consumed", 0) < len(messages) and time.monotonic() < deadline:
            assert worker.alive(), worker.tail()
            time.sleep(0.2)
        status = worker.status() or {}
        assert status.get("consumed") == len(messages), status
        peak, now = vm(worker.pid, "VmHWM"), vm(worker.pid, "VmRSS")
        bound = rss_bound(settings)
        print(
            f"offered {offered / MiB:.0f} MiB in {len(messages)} observations; "
            f"worker RSS ready {baseline / MiB:.0f} MiB, peak {peak / MiB:.0f} MiB "
            f"(+{(peak - baseline) / MiB:.0f}), after {now / MiB:.0f} MiB; "
            f"bound +{bound / MiB:.0f} MiB (max_state_bytes {STATE_BYTES / MiB:.0f} MiB)"
        )
        assert peak - baseline <= bound, (peak, baseline, bound)
        # Everything offered was accounted for: the huge ids refused at once, the rest evicted oldest first.
        # Each held point costs more than VALUE_PAD, so at most this many fit in max_state_bytes.
        fit = STATE_BYTES // VALUE_PAD
        reasons = dead_letter_reasons(settings, HUGE_IDS + BIG_SERIES - fit, timeout_s=60)
        assert reasons["oversize_id"] == HUGE_IDS, reasons
        assert reasons["evicted"] >= BIG_SERIES - fit, reasons
    finally:
        worker.terminate()
