"""The operations commands' pure parts and argument handling (no broker: fakes stand in for Kafka)."""

from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
from kafka.consumer.fetcher import ConsumerRecord
from kafka.structs import TopicPartition

from embedstream import cli, cli_support
from embedstream.config import load_settings
from embedstream.consume import deadletter as dl
from embedstream.errors import ConfigError, EmbedstreamError
from embedstream.ops import cli as ops_cli
from embedstream.ops.configcheck import MASK, render_masked
from embedstream.ops.dlq import DeadLetterRow, original_headers, plan_redrive, reason_counts, redrive_message
from embedstream.ops.kafka import parse_time_ms
from embedstream.ops.replay import REPLAY_SOURCE, replay_message
from embedstream.ops.tail import Sample, format_row, pca_2d, plot_pca, table_lines, tail
from embedstream.sinks.arrow_codec import RowMeta, encode_batch, output_schema
from embedstream.topic_reader import Span, clamp_spans


def run_ops(argv: list[str]) -> int:
    """The ops subcommands through argparse as `embedstream` wires them, with main()'s error handling."""
    parser = argparse.ArgumentParser(prog="embedstream")
    sub = parser.add_subparsers(dest="command", required=True)
    handlers = ops_cli.register(sub)
    args = parser.parse_args(argv)
    try:
        return handlers[args.command](args)
    except EmbedstreamError as exc:
        print(exc)
        return 2


def record(offset: int, value: bytes, key: bytes | None = b"k", headers=None, partition: int = 0, ts: int = 1000):
    return ConsumerRecord("t", partition, None, offset, ts, 0, key, value, headers or [], None, 0, len(value), 0)


def arrow_message(ids: list[str], dim: int = 8, model: str = "image-m", version: str = "1", seed: int = 0) -> bytes:
    schema = output_schema("image", model, version, dim)
    rows = [
        RowMeta(i.encode(), i, "in", 1, n, 1_700_000_000_000, {"source_width": 64, "source_height": 48})
        for n, i in enumerate(ids)
    ]
    emb = np.random.default_rng(seed).normal(size=(len(ids), dim)).astype(np.float32)
    return encode_batch(schema, rows, emb)


def test_ops_commands_are_registered_in_the_cli():
    assert "embedstream.ops.cli" in cli.COMMAND_MODULES


# --- config check -------------------------------------------------------------------------------------------


def test_config_check_masks_secrets_and_round_trips(tmp_path, monkeypatch, capsys):
    path = tmp_path / "w.toml"
    path.write_text('[kafka]\nsecurity_protocol = "SASL_SSL"\nsasl_mechanism = "PLAIN"\nsasl_username = "svc"\n')
    monkeypatch.setenv("EMBEDSTREAM_KAFKA__SASL_PASSWORD", "hunter2-secret")
    monkeypatch.setenv("EMBEDSTREAM_BATCH__MAX_SIZE", "16")
    assert run_ops(["config", "check", str(path)]) == 0
    out, err = capsys.readouterr()
    assert "hunter2" not in out + err
    assert f'sasl_password = "{MASK}"' in out
    assert "max_size = 16" in out  # the environment is part of the effective settings
    assert "OK" in err
    # What it prints is a config file again (secrets aside).
    printed = tmp_path / "printed.toml"
    printed.write_text(out)
    monkeypatch.delenv("EMBEDSTREAM_BATCH__MAX_SIZE")
    again = load_settings(printed)
    assert again.batch.max_size == 16 and again.kafka.sasl_username == "svc"


def test_config_check_reports_bad_values_with_exit_2(tmp_path, capsys):
    path = tmp_path / "bad.toml"
    path.write_text("[batch]\nmax_size = 0\n")
    assert run_ops(["config", "check", str(path)]) == 2
    assert "batch.max_size" in capsys.readouterr().err
    assert run_ops(["config", "check", str(tmp_path / "missing.toml")]) == 2
    assert "not found" in capsys.readouterr().err


def test_render_masked_shows_unset_keys_as_comments():
    text = render_masked(load_settings())
    assert "# sasl_password is unset" in text and "[kafka]" in text


def test_deploy_configs_pass_config_check():
    root = Path(__file__).resolve().parents[2]
    for path in [root / "deploy/config/worker.image.toml", root / "deploy/k8s/base/worker-image/worker.toml"]:
        assert run_ops(["config", "check", str(path)]) == 0


# --- shared Kafka helpers -----------------------------------------------------------------------------------


def test_parse_time_accepts_iso_and_epoch_ms():
    assert parse_time_ms("1700000000000") == 1_700_000_000_000
    assert parse_time_ms("2023-11-14T22:13:20Z") == 1_700_000_000_000
    assert parse_time_ms("2023-11-14T22:13:20") == 1_700_000_000_000  # naive means UTC
    assert parse_time_ms("2023-11-14T23:13:20+01:00") == 1_700_000_000_000
    with pytest.raises(ConfigError):
        parse_time_ms("yesterday")


def test_clamp_spans_keeps_requests_inside_the_log():
    low, high = {0: 10, 1: 0}, {0: 100, 1: 5}
    assert clamp_spans([0, 1], low, high, {}, {}) == [Span(0, 10, None, 100), Span(1, 0, None, 5)]
    assert [s.size for s in clamp_spans([0, 1], low, high, {}, {})] == [90, 5]
    # Retention moved the start: begin at the log's start. The end is not cut at the reported high (it may be low).
    spans = clamp_spans([0, 1], low, high, dict.fromkeys([0, 1], 3), dict.fromkeys([0, 1], 50))
    assert spans == [Span(0, 10, 50, 100), Span(1, 3, 50, 5)]
    (span,) = clamp_spans([0], low, high, {0: 80}, {0: 20})  # end before start: empty
    assert span.empty and span.size == 0


class _Recorder:
    """Stands in for a kafka-python client class: keeps the keyword arguments it was built with."""

    built: ClassVar[list[dict]] = []

    def __init__(self, **conf) -> None:
        self.built.append(conf)


@pytest.fixture
def recorded_clients(monkeypatch):
    from embedstream import kafka_io

    _Recorder.built = []
    for name in ("KafkaConsumer", "KafkaProducer", "KafkaAdminClient"):
        monkeypatch.setattr(kafka_io, name, _Recorder)
    monkeypatch.setattr(kafka_io, "check_connection", lambda k, **_: None)  # no broker behind the recorder
    return _Recorder.built


def test_every_client_builder_applies_the_security_settings(recorded_clients):
    from embedstream.config import KafkaSettings
    from embedstream.kafka_io import make_admin, make_consumer, make_producer, make_reader, make_writer

    k = KafkaSettings(
        bootstrap_servers="b:9093", security_protocol="SASL_SSL", sasl_mechanism="PLAIN", sasl_username="svc",
        sasl_password="pw", ssl_cafile="/ca.pem",
    )  # fmt: skip
    make_consumer(k, "c")
    make_producer(k, "p")
    make_reader(k)
    make_writer(k)
    make_admin(k, request_timeout_ms=2000)
    assert len(recorded_clients) == 5
    for conf in recorded_clients:
        assert conf["bootstrap_servers"] == "b:9093" and conf["security_protocol"] == "SASL_SSL"
        assert conf["sasl_plain_username"] == "svc" and conf["sasl_plain_password"] == "pw"
        assert conf["ssl_cafile"] == "/ca.pem"
    assert recorded_clients[4]["request_timeout_ms"] == 2000


def test_reader_and_writer_knobs(recorded_clients):
    from embedstream.config import KafkaSettings
    from embedstream.kafka_io import make_reader, make_writer

    k = KafkaSettings(client_id="es", max_partition_fetch_bytes=4096, producer_linger_ms=7)
    make_reader(k, client_id="es-ops")
    make_reader(k, auto_offset_reset="earliest", read_committed=True, settings_fetch_sizes=False)
    make_writer(k, client_id="es-ops", enable_idempotence=True)
    make_writer(k, linger_ms=0, max_request_size=16 << 20)
    ops, local, ops_writer, local_writer = recorded_clients
    assert ops["group_id"] is None and ops["enable_auto_commit"] is False and ops["client_id"] == "es-ops"
    assert ops["max_partition_fetch_bytes"] == 4096 and ops["isolation_level"] == "read_uncommitted"
    assert "client_id" not in local and "max_partition_fetch_bytes" not in local  # the client's defaults
    assert local["auto_offset_reset"] == "earliest" and local["isolation_level"] == "read_committed"
    assert ops_writer["linger_ms"] == 7 and ops_writer["enable_idempotence"] is True and ops_writer["acks"] == "all"
    assert local_writer["linger_ms"] == 0 and local_writer["max_request_size"] == 16 << 20
    assert "enable_idempotence" not in local_writer and "transactional_id" not in local_writer


def test_partitions_of_waits_for_metadata_then_gives_up(monkeypatch):
    from embedstream import kafka_io

    monkeypatch.setattr(kafka_io.time, "sleep", lambda s: None)
    answers = iter([None, set(), {2, 0, 1}])
    late = type("C", (), {"partitions_for_topic": lambda self, topic: next(answers)})()
    assert kafka_io.partitions_of(late, "t") == [0, 1, 2]
    never = type("C", (), {"partitions_for_topic": lambda self, topic: None})()
    with pytest.raises(kafka_io.NoPartitions, match="'t' does not exist") as err:
        kafka_io.partitions_of(never, "t", timeout_s=0.0)
    # An operator's command reports it as a configuration error; the local tools' callers as a timeout.
    assert isinstance(err.value, ConfigError) and isinstance(err.value, TimeoutError)


# --- without the tools extra (rich, matplotlib) --------------------------------------------------------------


def test_workers_and_ops_commands_load_without_rich_or_matplotlib():
    import subprocess
    import sys

    code = (
        "import sys\n"
        "for name in ('rich', 'matplotlib'):\n"
        "    sys.modules[name] = None  # importing it now raises ImportError\n"
        "import embedstream.cli, embedstream.service, embedstream.worker\n"
        "embedstream.cli.build_parser()\n"
        "import embedstream.ops.tail, embedstream.ops.replay, embedstream.ops.dlq, embedstream.ops.configcheck\n"
        "import embedstream.local.demo, embedstream.local.bench.report, embedstream.local.bench.plots\n"
        "import embedstream.local.bench.run\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr


def test_require_tools_names_the_extra(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ConfigError, match=r"--plot needs matplotlib.*pip install 'embedstream\[tools\]'"):
        cli_support.require_tools("--plot", "json", "matplotlib")
    cli_support.require_tools("--plot", "json")


def test_tail_plot_without_matplotlib_fails_before_reading(monkeypatch, capsys):
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setattr(ops_cli, "_reader", lambda k: pytest.fail("read before the plot check"))
    assert run_ops(["tail", "out", "--plot", "pca.png"]) == 2
    assert "embedstream[tools]" in capsys.readouterr().out


def test_replay_progress_without_rich_prints_plain_lines(monkeypatch, capsys):
    import sys

    monkeypatch.setitem(sys.modules, "rich", None)
    monkeypatch.setitem(sys.modules, "rich.console", None)
    monkeypatch.setitem(sys.modules, "rich.progress", None)
    with ops_cli._replay_progress(20) as advance:
        for _ in range(7):
            advance(3)
    lines = capsys.readouterr().err.splitlines()
    assert lines == [f"# replay: {n}/20" for n in (3, 6, 9, 12, 15, 18, 21)]


# --- tail ---------------------------------------------------------------------------------------------------


class FakeConsumer:
    """Just enough of KafkaConsumer for tail(): assigned partitions with fixed logs."""

    def __init__(self, logs: dict[int, list[bytes]]) -> None:
        self.logs = logs
        self.pos: dict[int, int] = defaultdict(int)

    def partitions_for_topic(self, topic):
        return set(self.logs)

    def assign(self, tps):
        self.tps = tps

    def seek_to_beginning(self, *tps):
        for tp in tps:
            self.pos[tp.partition] = 0

    def seek_to_end(self, *tps):
        for tp in tps:
            self.pos[tp.partition] = len(self.logs[tp.partition])

    def end_offsets(self, tps):
        return {tp: len(self.logs[tp.partition]) for tp in tps}

    def position(self, tp):
        return self.pos[tp.partition]

    def poll(self, timeout_ms):
        out = {}
        for p, log in self.logs.items():
            if self.pos[p] < len(log):
                out[TopicPartition("out", p)] = [record(o, log[o], partition=p) for o in range(self.pos[p], len(log))]
                self.pos[p] = len(log)
        return out


def test_format_row_shows_id_source_model_dims_and_norm():
    line = format_row(
        {
            "id": "cam-1",
            "source_topic": "images",
            "source_partition": 2,
            "source_offset": 17,
            "model_name": "m",
            "model_version": "3",
        },
        np.array([3.0, 4.0, 0.0], np.float32),
        dims=2,
    )
    assert line == "cam-1  images/2@17  m:3  dim=3  [+3.0000, +4.0000, ...]  norm=5.0000"


def test_tail_from_beginning_stops_at_the_end_and_skips_foreign_messages():
    consumer = FakeConsumer({0: [arrow_message(["a", "b"])], 1: [b"not arrow", arrow_message(["c"], seed=1)]})
    lines: list[str] = []
    sample = Sample(limit=10)
    rows, bad = tail(
        consumer,
        "out",
        from_beginning=True,
        follow=False,
        max_rows=None,
        timeout_s=5,
        dims=3,
        emit=lines.append,
        sample=sample,
        caught_up_idle_s=0.1,
    )
    assert (rows, bad) == (3, 1)
    assert sorted(line.split()[0] for line in lines if not line.startswith("#")) == ["a", "b", "c"]
    assert sample.size == 3 and sample.data()[0].shape == (3, 8)


def test_tail_max_rows_cuts_inside_a_message():
    consumer = FakeConsumer({0: [arrow_message(["a", "b", "c"])]})
    lines: list[str] = []
    rows, _ = tail(
        consumer, "out", from_beginning=True, follow=True, max_rows=2, timeout_s=5, dims=2, emit=lines.append
    )
    assert rows == 2 and [line.split()[0] for line in lines] == ["a", "b"]


def test_tail_from_latest_skips_what_is_there():
    consumer = FakeConsumer({0: [arrow_message(["old"])]})
    lines: list[str] = []
    rows, _ = tail(
        consumer, "out", from_beginning=False, follow=True, max_rows=None, timeout_s=0.3, dims=2, emit=lines.append
    )
    assert rows == 0 and lines == []


def test_pca_finds_the_two_directions_of_the_data():
    rng = np.random.default_rng(0)
    basis = np.linalg.qr(rng.normal(size=(16, 2)))[0].T  # two orthonormal directions in 16-D
    coeffs = rng.normal(size=(200, 2)) * np.array([5.0, 1.0])
    coords, ratio = pca_2d(coeffs @ basis + 3.0)
    assert ratio.sum() == pytest.approx(1.0, abs=1e-9) and ratio[0] > ratio[1]
    # Up to sign, PC1 is the large-variance coefficient.
    assert abs(np.corrcoef(coords[:, 0], coeffs[:, 0])[0, 1]) > 0.999
    assert pca_2d(np.ones((1, 4)))[0].shape == (1, 2)


def test_plot_pca_writes_a_png(tmp_path):
    path = tmp_path / "sub" / "pca.png"
    matrix = np.random.default_rng(1).normal(size=(50, 8))
    plot_pca(matrix, ["m:1"] * 25 + ["m:2"] * 25, path, "out")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000


def test_table_lines_one_per_row():
    import pyarrow as pa

    table = pa.ipc.open_stream(arrow_message(["x", "y"])).read_all()
    assert [line.split()[0] for line in table_lines(table, 2)] == ["x", "y"]


# --- replay -------------------------------------------------------------------------------------------------


def test_replay_message_keeps_key_value_headers_timestamp_and_partition():
    rec = record(41, b"img", key=b"cam-1", headers=[("content-type", b"image/jpeg")], partition=2, ts=123)
    msg = replay_message(rec, "images.replay", {0, 1, 2})
    assert msg["topic"] == "images.replay" and msg["key"] == b"cam-1" and msg["value"] == b"img"
    assert msg["partition"] == 2 and msg["timestamp_ms"] == 123
    assert msg["headers"] == [("content-type", b"image/jpeg"), (REPLAY_SOURCE, b"t/2/41")]
    # A target with fewer partitions: the key decides, as for any producer.
    assert replay_message(rec, "r", {0})["partition"] is None


def test_replay_rejects_contradictory_arguments(capsys):
    assert run_ops(["replay", "--from-topic", "a", "--to-topic", "a"]) == 2
    assert "must differ" in capsys.readouterr().out
    assert run_ops(["replay", "--from-topic", "a", "--to-topic", "b", "--start-offset", "1", "--start-time", "5"]) == 2
    assert run_ops(["replay", "--to-topic", "b"]) == 2
    assert run_ops(["replay", "--from-topic", "a", "--to-topic", "b", "--partition", "x"]) == 2


# --- dlq ----------------------------------------------------------------------------------------------------


def dead_letter(offset: int, reason: str, value: bytes = b"bytes", dropped: int | None = None):
    headers = [
        (dl.REASON, reason.encode()),
        (dl.ERROR_CLASS, b"ValueError"),
        (dl.MESSAGE, b"cannot identify image"),
        (dl.SOURCE_TOPIC, b"images"),
        (dl.SOURCE_PARTITION, b"1"),
        (dl.SOURCE_OFFSET, str(100 + offset).encode()),
        (dl.WORKER_ID, b"w-1"),
    ]
    if dropped is not None:
        headers.append((dl.VALUE_DROPPED, str(dropped).encode()))
        value = b""
    headers.append(("trace-id", b"abc"))
    return record(offset, value, key=f"key-{offset}".encode(), headers=headers)


def test_dead_letter_row_reads_the_headers():
    row = DeadLetterRow.of(dead_letter(3, "undecodable"))
    assert (row.reason, row.error_class, row.source, row.size) == ("undecodable", "ValueError", "images/1@103", 5)
    assert row.value_dropped is None and row.key_text() == "key-3"
    assert DeadLetterRow.of(dead_letter(4, "oversize", dropped=20_000_000)).value_dropped == 20_000_000
    rows = [DeadLetterRow.of(dead_letter(i, r)) for i, r in enumerate(["empty", "undecodable", "undecodable"])]
    assert reason_counts(rows) == [("undecodable", 2), ("empty", 1)]


def test_redrive_keeps_original_bytes_key_and_headers_only():
    rec = dead_letter(1, "undecodable")
    msg = redrive_message(rec, "images")
    assert msg == {"topic": "images", "key": b"key-1", "value": b"bytes", "headers": [("trace-id", b"abc")]}
    assert original_headers(rec.headers) == [("trace-id", b"abc")]


def test_redrive_plan_filters_by_reason_and_skips_dropped_values():
    records = [dead_letter(0, "undecodable"), dead_letter(1, "oversize", dropped=99), dead_letter(2, "empty")]
    plan = plan_redrive(records, None)
    assert [r.offset for r in plan.send] == [0, 2] and [r.offset for r in plan.dropped] == [1]
    plan = plan_redrive(records, "undecodable")
    assert [r.offset for r in plan.send] == [0] and plan.dropped == [] and plan.other_reason == 2


def test_redrive_needs_a_target(monkeypatch, capsys):
    monkeypatch.setattr(ops_cli, "_read_dead_letters", lambda consumer, topic: [dead_letter(0, "empty")])
    no_consumer = type("C", (), {"close": lambda self: None})
    monkeypatch.setattr("embedstream.kafka_io.make_reader", lambda k, **_: no_consumer())
    assert run_ops(["dlq", "redrive", "dlq"]) == 2
    assert "--to is required" in capsys.readouterr().out
