"""Faults of the broker and its storage, on the durable local broker (Tansu storing in a local S3 server).

The broker SIGKILLed and restarted on the same storage, the storage server frozen for 10 s, the
whole stack killed and started again, and exactly-once with a killed worker: missing is 0 in each;
duplicates are counted (at-least-once) and reported. Also here: a wrong storage setting is named at
start-up instead of showing up later as client time-outs.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import time

import pytest

from embedstream.kafka_io import make_admin
from embedstream.local.readback import TopicReader
from embedstream.local.stack.broker import LocalBroker
from embedstream.local.stack.storage import S3Location, StorageError
from embedstream.local.stack.worker_process import WorkerProcess

from ..integration.helpers import wait_for_rows
from .test_faults import N, _finish, _stream, exactly_once_with_a_killed_worker

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _committed(settings, partitions: int = 6) -> dict[int, int]:
    from kafka import TopicPartition

    group, topic = settings.kafka.group_id, settings.kafka.input_topic
    admin = make_admin(settings.kafka)
    try:
        offsets = admin.list_group_offsets({group: [TopicPartition(topic, p) for p in range(partitions)]})[group]
    finally:
        admin.close()
    return {tp.partition: meta.offset for tp, meta in offsets.items() if meta.offset >= 0}


def _uncovered_commits(settings) -> list[tuple[int, int]]:
    """Input (partition, offset) pairs below the group's committed offsets that have no output row.

    The committed offsets are read first, then the output: a worker publishes before it commits, so
    any pair listed is a commit past a message that was never published.
    """
    committed = _committed(settings)
    reader = TopicReader(settings.kafka)
    try:
        idle_since = time.monotonic()
        while time.monotonic() - idle_since < 2.0:
            if reader.poll(0.3):
                idle_since = time.monotonic()
        table = reader.result.table()
    finally:
        reader.close()
    columns = (table.column("source_partition").to_pylist(), table.column("source_offset").to_pylist())
    done = set(zip(*columns, strict=True))
    return [(p, o) for p, upto in committed.items() for o in range(upto) if (p, o) not in done]


def test_broker_sigkilled_mid_stream_restarts_on_its_storage(durable, durable_lane, report):
    settings, workdir = durable_lane
    keys = _stream(settings, "brokerkill")
    worker = WorkerProcess(settings, workdir, "w-a").start()
    try:
        seen = wait_for_rows(settings, 30)
        assert 30 <= seen < N, f"the kill must land mid-stream (saw {seen}); worker log:\n{worker.tail()}"
        durable.broker.kill()
        durable.broker.start()
        _finish(settings, keys, report, time.monotonic())
        assert worker.alive(), f"the running worker carries on across the broker restart:\n{worker.tail()}"
    finally:
        worker.terminate()
        if not durable.broker.alive():
            durable.broker.start()


def test_storage_server_frozen_10s_while_messages_flow(durable, durable_lane, report):
    settings, workdir = durable_lane
    keys = _stream(settings, "s3freeze")
    worker = WorkerProcess(settings, workdir, "w-a").start()
    pid = durable.storage.pid
    assert pid is not None
    try:
        assert wait_for_rows(settings, 30) < N
        os.kill(pid, signal.SIGSTOP)  # every object read and write of the broker hangs
        time.sleep(10)
        os.kill(pid, signal.SIGCONT)
        cleared = time.monotonic()
        uncovered = _uncovered_commits(settings)
        assert not uncovered, f"committed past messages with no output: {uncovered[:10]}"
        _finish(settings, keys, report, cleared)
        assert worker.alive(), f"the worker rode out the storage outage:\n{worker.tail()}"
    finally:
        os.kill(pid, signal.SIGCONT)
        worker.terminate()


def test_whole_durable_stack_killed_and_started_again(durable, durable_lane, report):
    settings, workdir = durable_lane
    keys = _stream(settings, "stackkill")
    worker = WorkerProcess(settings, workdir, "w-a").start()
    try:
        seen = wait_for_rows(settings, 30)
        assert 30 <= seen < N, f"the kill must land mid-stream (saw {seen}); worker log:\n{worker.tail()}"
    finally:
        # Everything at once, as a power cut would: nothing gets to flush or commit.
        worker.kill()
        durable.broker.kill()
        durable.storage.kill()
        durable.triton.kill()
    started = time.monotonic()
    durable.start()
    durable.triton.start()
    second = WorkerProcess(settings, workdir, "w-b").start()
    try:
        _finish(settings, keys, report, started, restart_s=round(time.monotonic() - started, 1))
    finally:
        second.terminate()


def test_exactly_once_on_the_durable_broker_worker_killed_mid_transaction(durable, durable_lane, report):
    settings, workdir = durable_lane
    exactly_once_with_a_killed_worker(settings, workdir, report, "eos-durable")


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"bucket": "no-such-bucket"}, "bucket 'no-such-bucket' does not exist"),
        ({"allow_http": False}, "HTTP is not allowed"),
        ({"endpoint": "http://127.0.0.1:9"}, "unreachable"),
    ],
)
def test_a_wrong_storage_setting_is_named_at_start_up(durable, tmp_path, change, named):
    location = dataclasses.replace(durable.storage.location, **change)
    started = time.monotonic()
    with pytest.raises(StorageError, match=named):
        LocalBroker(tmp_path, storage=location).start()
    assert time.monotonic() - started < 10, "named at once, not after client time-outs"


class _Unchecked(S3Location):
    """A location whose own checks are skipped: what the broker itself must still catch."""

    def check(self, timeout_s: float = 3.0) -> None:
        return None


@pytest.mark.parametrize("change", [{"bucket": "no-such-bucket"}, {"allow_http": False}])
def test_a_broker_that_cannot_use_its_storage_is_not_declared_ready(durable, tmp_path, change):
    loc = durable.storage.location
    location = _Unchecked(**{**dataclasses.asdict(loc), **change})
    with pytest.raises(StorageError, match=r"cannot use its storage|did not store a probe record"):
        LocalBroker(tmp_path, storage=location).start()
