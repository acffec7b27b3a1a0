"""The operations commands against the real broker (and, for one test, a real worker's output)."""

from __future__ import annotations

import time

import pytest
from kafka.structs import TopicPartition

from embedstream.config import KafkaSettings
from embedstream.consume import deadletter as dl
from embedstream.kafka_io import ensure_topics, make_reader, make_writer, partitions_of
from embedstream.local.samples.generated import samples
from embedstream.local.stack.worker_process import WorkerProcess
from embedstream.ops.replay import REPLAY_SOURCE
from tests.integration.helpers import produce, read_until_complete
from tests.unit.test_ops import arrow_message, run_ops

pytestmark = pytest.mark.integration


def read_topic(bootstrap: str, topic: str, expected: int, timeout_s: float = 30.0) -> list:
    consumer = make_reader(KafkaSettings(bootstrap_servers=bootstrap))
    try:
        deadline = time.monotonic() + timeout_s
        tps = [TopicPartition(topic, p) for p in partitions_of(consumer, topic, timeout_s)]
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        got: list = []
        while len(got) < expected and time.monotonic() < deadline:
            for records in consumer.poll(timeout_ms=300).values():
                got.extend(records)
        return got
    finally:
        consumer.close()


def send(bootstrap: str, topic: str, messages: list[dict]) -> None:
    producer = make_writer(KafkaSettings(bootstrap_servers=bootstrap), linger_ms=0, max_request_size=16 << 20)
    for m in messages:
        producer.send(topic, **m)
    producer.flush()
    producer.close()


def test_tail_prints_rows_and_writes_a_pca_plot(lane, tmp_path, capsys):
    out = lane.settings.kafka.output_topic
    ids = [f"row-{i}" for i in range(30)]
    send(
        lane.bootstrap,
        out,
        [{"value": arrow_message(ids[i : i + 10], dim=16, version=str(1 + i // 20), seed=i), "partition": i % 3}
         for i in range(0, 30, 10)],
    )  # fmt: skip
    png = tmp_path / "pca.png"
    argv = ["tail", out, "--bootstrap", lane.bootstrap, "--from", "beginning", "--dims", "3", "--plot", str(png)]
    assert run_ops(argv) == 0
    stdout, stderr = capsys.readouterr()
    lines = stdout.splitlines()
    assert sorted(line.split()[0] for line in lines) == sorted(ids)
    assert all("in/1@" in line and "image-m:" in line and "norm=" in line for line in lines)
    assert "# 30 rows" in stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000

    assert run_ops(["tail", out, "--bootstrap", lane.bootstrap, "--from", "beginning", "--max", "5"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 5


def test_replay_copies_an_offset_range_with_keys_and_headers(lane, capsys):
    k = lane.settings.kafka
    src = k.input_topic
    send(
        lane.bootstrap,
        src,
        [{"key": f"k{i}".encode(), "value": f"v{i}".encode(), "headers": [("h", str(i).encode())], "partition": i % 3}
         for i in range(30)],
    )  # fmt: skip
    target = f"{src}.replay"
    argv = ["replay", "--bootstrap", lane.bootstrap, "--from-topic", src, "--to-topic", target]
    assert run_ops([*argv, "--partition", "0,2", "--start-offset", "2", "--end-offset", "7"]) == 0
    assert "replayed 10 records" in capsys.readouterr().out
    got = read_topic(lane.bootstrap, target, 10)
    assert len(got) == 10
    for rec in got:
        i = int(rec.key[1:])
        assert rec.value == f"v{i}".encode()
        assert rec.partition == i % 3 and rec.partition in (0, 2)  # each record kept its partition
        headers = dict(rec.headers)
        assert headers["h"] == str(i).encode()
        source_topic, source_partition, source_offset = headers[REPLAY_SOURCE].decode().rsplit("/", 2)
        assert source_topic == src and int(source_partition) == rec.partition and 2 <= int(source_offset) < 7

    # By time: everything produced from now on, nothing before.
    time.sleep(1.1)
    start = int(time.time() * 1000)
    send(lane.bootstrap, src, [{"key": b"late", "value": b"late", "partition": 1}])
    assert run_ops([*argv[:-1], f"{target}.t", "--start-time", str(start)]) == 0
    assert "replayed 1 records" in capsys.readouterr().out
    assert [r.key for r in read_topic(lane.bootstrap, f"{target}.t", 1)] == [b"late"]


def test_dlq_redrive_skips_dropped_values_and_filters_by_reason(lane, capsys):
    k = lane.settings.kafka

    def letter(i: int, reason: str, dropped: bool = False) -> dict:
        headers = [(dl.REASON, reason.encode()), (dl.SOURCE_TOPIC, b"images"), (dl.SOURCE_PARTITION, b"0"),
                   (dl.SOURCE_OFFSET, str(i).encode())]  # fmt: skip
        if dropped:
            headers.append((dl.VALUE_DROPPED, b"20000000"))
        headers.append(("trace", f"t{i}".encode()))
        return {"key": f"d{i}".encode(), "value": b"" if dropped else f"orig-{i}".encode(), "headers": headers}

    letters = [
        letter(0, "undecodable"),
        letter(1, "oversize", dropped=True),
        letter(2, "empty"),
        letter(3, "undecodable"),
    ]
    send(lane.bootstrap, k.dead_letter_topic, letters)
    target = f"{k.input_topic}.redrive"
    ensure_topics(k, {target: 1})
    base = ["dlq", "redrive", k.dead_letter_topic, "--bootstrap", lane.bootstrap, "--to", target]
    assert run_ops([*base, "--reason", "undecodable"]) == 0
    out, err = capsys.readouterr()
    assert "redriven 2 dead letters" in out and "another reason" in err
    assert run_ops(base) == 0
    out, err = capsys.readouterr()
    assert "redriven 3 dead letters" in out
    assert "skipped 1 dead letters whose value was dropped" in err and "images/0@1" in err
    got = read_topic(lane.bootstrap, target, 5)
    assert sorted(r.key for r in got) == [b"d0", b"d0", b"d2", b"d3", b"d3"]
    for rec in got:
        i = rec.key.decode()[1:]
        assert rec.value == f"orig-{i}".encode() and rec.headers == [("trace", f"t{i}".encode())]


@pytest.mark.slow
def test_ops_on_a_real_workers_output(lane, tmp_path, capsys):
    """A worker embeds 5 images and dead-letters 2; tail, dlq list and dlq redrive work on what it wrote."""
    k = lane.settings.kafka
    batch = list(samples(7, bad_every=3, prefix="ops"))
    worker = WorkerProcess(lane.settings, lane.workdir).start().wait_ready()
    try:
        produce(lane.bootstrap, k.input_topic, [(s.key, s.value) for s in batch])
        result = read_until_complete(lane.settings, [s.key for s in batch], timeout_s=180, settle_s=0.5)
    finally:
        worker.terminate()
    assert result.rows == 5 and len(result.dead_letters) == 2

    png = tmp_path / "pca.png"
    assert (
        run_ops(["tail", k.output_topic, "--bootstrap", lane.bootstrap, "--from", "beginning", "--plot", str(png)]) == 0
    )
    out = capsys.readouterr().out
    good = sorted(s.key.decode() for s in batch if s.good)
    assert sorted(line.split()[0] for line in out.splitlines()) == good
    assert f"{k.input_topic}/" in out and png.stat().st_size > 0

    assert run_ops(["dlq", "list", k.dead_letter_topic, "--bootstrap", lane.bootstrap]) == 0
    out = capsys.readouterr().out
    assert "2 dead letters" in out and "undecodable" in out
    assert all(s.key.decode() in out for s in batch if not s.good)

    # The worker is stopped, so the re-driven originals stay on the input topic to be checked.
    assert run_ops(["dlq", "redrive", k.dead_letter_topic, "--bootstrap", lane.bootstrap, "--to", k.input_topic]) == 0
    assert "redriven 2 dead letters" in capsys.readouterr().out
    on_input = read_topic(lane.bootstrap, k.input_topic, len(batch) + 2)
    bad = {s.key: s.value for s in batch if not s.good}
    again = [r for r in on_input if r.key in bad]
    assert len(again) == 4 and all(r.value == bad[r.key] for r in again)
