"""A text worker and a time-series worker SIGKILLed mid-stream on the durable local broker.

One durable stack of its own (Tansu storing in a local S3 server, a CPU Triton serving MiniLM and a
freshly trained autoencoder). Text: every sentence comes out as a row, duplicates counted. Time
series: one observation a message, so the killed worker leaves open windows whose points it never
committed; the worker that takes over re-reads them and every window of every series comes out,
none missing, duplicates counted.
"""

from __future__ import annotations

import json
import math
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pyarrow.csv as pcsv
import pytest
from kafka import KafkaProducer

from embedstream.config import Settings, load_settings
from embedstream.local import pipelines
from embedstream.local.readback import TopicReader
from embedstream.local.samples.traffic import text_traffic
from embedstream.local.stack.stack import LocalStack
from embedstream.local.stack.worker_process import WorkerProcess
from embedstream.training import synthetic
from embedstream.training.fit import TrainConfig, train_from_file

from ..integration.helpers import private_topics, produce, wait_for_rows
from .test_faults import killed_mid_stream_then_replaced

pytestmark = [pytest.mark.integration, pytest.mark.slow]

T, STRIDE, CHANNELS = 32, 16, 3
SERIES = {"series-a": 0, "series-b": 1}  # series -> partition
FIRST, SECOND = 2400, 800  # points per series before and after the kill
TEXTS = 900


@pytest.fixture(scope="module")
def durable_stack(tmp_path_factory) -> Iterator[tuple[LocalStack, Settings, Settings]]:
    root = tmp_path_factory.mktemp("durable-kills")
    pcsv.write_csv(synthetic.normal_table(8, 400, seed=0, channels=CHANNELS), str(root / "normal.csv"))
    weights = train_from_file(
        root / "normal.csv", root / "weights", ("autoencoder",), TrainConfig(window=T, ae_epochs=10)
    )
    fast = {"commit_interval_ms": 500, "triton": {"request_timeout_s": 5.0}}
    text = pipelines.text_settings(load_settings(**fast))
    series = load_settings(
        encoder={"family": "autoencoder", "weights": str(weights["autoencoder"]), "max_batch_size": 64},
        batch={"max_size": 64, "max_wait_ms": 20},
        timeseries={"stride": STRIDE},
        **fast,
    )
    with LocalStack([text, series], workdir=root / "stack", partitions=2, durable=True) as stack:
        text_local, series_local = stack.all_settings
        yield stack, text_local, series_local


def test_text_worker_sigkilled_mid_stream_on_the_durable_broker(durable_stack, tmp_path, request, report):
    _, base, _ = durable_stack
    settings = private_topics(base, request.node.name, partitions=2)
    messages = text_traffic(settings, TEXTS, bad_every=0).messages
    produce(settings.kafka.bootstrap_servers, settings.kafka.input_topic, messages)
    keys = [key for key, _ in messages]
    killed_mid_stream_then_replaced(settings, tmp_path, keys, report, at_least=60, name="w-text")


def _observations(start: int, stop: int) -> list[tuple[bytes, bytes, int]]:
    out = []
    for i in range(start, stop):
        for series, partition in SERIES.items():
            values = [math.sin(i / 7 + c) + 0.1 * math.cos(i / 3 * (c + 1)) for c in range(CHANNELS)]
            doc = {"series_id": series, "timestamp_ms": synthetic.START_MS + i * synthetic.STEP_MS, "values": values}
            out.append((series.encode(), json.dumps(doc).encode(), partition))
    return out


def _send(bootstrap: str, topic: str, messages: list[tuple[bytes, bytes, int]]) -> None:
    producer = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=5, acks="all", batch_size=1 << 20)
    for key, value, partition in messages:
        producer.send(topic, key=key, value=value, partition=partition)
    producer.flush()
    producer.close()


def _windows(settings: Settings, expected: set[tuple[str, float]], timeout_s: float = 180.0) -> Counter:
    """(series, window start) -> how many rows carried it, read until every expected window is there."""
    reader = TopicReader(settings.kafka)
    try:
        counts: Counter = Counter()
        deadline = time.monotonic() + timeout_s
        settle_until = None
        while time.monotonic() < deadline:
            reader.poll(0.3)
            counts = Counter(
                (r["series_id"], r["window_start"].timestamp()) for t in reader.result.tables for r in t.to_pylist()
            )
            if settle_until is None and expected <= set(counts):
                settle_until = time.monotonic() + 2.0  # a little longer, for late duplicates
            if settle_until is not None and time.monotonic() >= settle_until:
                break
        assert not reader.result.dead_letters, [(d.key, d.reason) for d in reader.result.dead_letters]
        return counts
    finally:
        reader.close()


def test_timeseries_worker_sigkilled_mid_window_on_the_durable_broker(durable_stack, tmp_path, request, report):
    _, _, base = durable_stack
    settings = private_topics(base, request.node.name, partitions=2)
    topic, bootstrap = settings.kafka.input_topic, settings.kafka.bootstrap_servers
    _send(bootstrap, topic, _observations(0, FIRST))
    first = WorkerProcess(settings, Path(tmp_path), "w-ts-a").start()
    try:
        seen = wait_for_rows(settings, 20)
        assert seen >= 20, f"worker log:\n{first.tail()}"
    finally:
        first.kill()  # its series' open windows hold points it never committed
    _send(bootstrap, topic, _observations(FIRST, FIRST + SECOND))
    cleared = time.monotonic()
    total = FIRST + SECOND
    starts = [(synthetic.START_MS + k * STRIDE * synthetic.STEP_MS) / 1000 for k in range((total - T) // STRIDE + 1)]
    expected = {(series, start) for series in SERIES for start in starts}
    second = WorkerProcess(settings, Path(tmp_path), "w-ts-b").start()
    try:
        counts = _windows(settings, expected)
    finally:
        second.terminate()
    missing = len(expected - set(counts))
    duplicates = sum(n - 1 for n in counts.values() if n > 1)
    report(
        produced=len(expected),  # windows the stream holds (from total * len(SERIES) observations)
        embedded=len(counts),
        dead_lettered=0,
        duplicates=duplicates,
        missing=missing,
        recovery_s=round(time.monotonic() - cleared, 1),
        unit="windows",
    )
    assert missing == 0 and set(counts) == expected, sorted(set(counts) ^ expected)[:5]
