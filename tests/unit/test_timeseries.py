"""Time series: decoding, per-series windows (offsets, late points, eviction, restart) and the worker loop."""

import json
import math
import warnings

import numpy as np
import orjson
import pytest
from kafka.structs import TopicPartition

from embedstream.config import load_settings
from embedstream.consume.deadletter import REASON, SOURCE_OFFSET
from embedstream.encoders import get_family
from embedstream.errors import ConfigError
from embedstream.inference.local import TorchBackend
from embedstream.modalities import modality_for
from embedstream.modalities.timeseries import (
    Observation,
    SlidingWindows,
    TimeSeriesModality,
    TimeSeriesWindow,
    parse_timeseries,
)
from embedstream.records import BadRecord, Deferred, SourceMessage
from embedstream.sinks.arrow_codec import decode_embeddings
from embedstream.testing import FakeBackend, FakeConsumer, FakeProducer
from embedstream.worker import Worker

TOPIC = "ts"
TP0 = TopicPartition(TOPIC, 0)


def msg(doc, offset=0, partition=0, key=b"k", raw=None):
    value = raw if raw is not None else orjson.dumps(doc)
    return SourceMessage(TOPIC, partition, offset, key, value, 1_000 + offset)


def obs_doc(series, ts, values=(1.0, 2.0, 3.0)):
    return {"series_id": series, "timestamp_ms": ts, "values": list(values)}


def parse(doc=None, raw=None, length=4, channels=3):
    return parse_timeseries(msg(doc, raw=raw), length, channels, 10_000)


# -- decoding ---------------------------------------------------------------------------------------


def test_an_observation_and_a_window_decode():
    o = parse(obs_doc("s", 5, (1, 2.5, -3)))
    assert isinstance(o, Observation) and o.series_id == "s" and o.timestamp_ms == 5
    assert o.values.dtype == np.float32 and o.values.tolist() == [1, 2.5, -3]
    w = parse({"series_id": "s", "values": [[i, i, i] for i in range(4)], "start_ms": 1, "end_ms": 9})
    assert isinstance(w, TimeSeriesWindow) and w.values.shape == (4, 3) and (w.start_ms, w.end_ms) == (1, 9)
    assert w.covers == ((TP0, 0),)
    bare = parse({"series_id": "s", "values": [[0, 0, 0]] * 4})
    assert (bare.start_ms, bare.end_ms) == (1_000, 1_000), "times default to the Kafka timestamp"


def test_values_up_to_the_float32_limit_decode_exactly_without_numpy_warnings():
    top = float(np.finfo(np.float32).max)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an overflowing cast would warn
        o = parse(obs_doc("s", 5, (top, -top, 2**40)))
        bad = parse(obs_doc("s", 5, (top * 1.0001, 0, 0)))
    assert isinstance(o, Observation) and o.values.tolist() == [top, -top, 2**40]
    assert isinstance(bad, BadRecord) and bad.reason == "non_finite" and "1 value(s)" in bad.message


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"", "empty"),
        (b"x" * 10_001, "oversize"),
        (b"{not json", "invalid_timeseries"),
        (b"\xff\xfe", "invalid_timeseries"),
        (b"[1, 2]", "invalid_timeseries"),
        (b'{"series_id": "s", "timestamp_ms": 1, "values": [1, 2, NaN]}', "non_finite"),
        (b'{"series_id": "s", "timestamp_ms": 1, "values": [1, Infinity, 3]}', "non_finite"),
        (b'{"series_id": "s", "timestamp_ms": 1, "values": [1, -Infinity, 3]}', "non_finite"),
        (b'{"series_id": "s", "timestamp_ms": 1, "values": [1, null, 3]}', "non_finite"),
        (b'{"series_id": "s", "timestamp_ms": 1, "values": [1, 1e39, 3]}', "non_finite"),
        (b'{"series_id": "s", "timestamp_ms": 1, "values": [1, 1e400, 3]}', "non_finite"),
        (b'{"series_id": "s", "timestamp_ms": 1, "values": [1, 2]}', "wrong_shape"),
        (b'{"series_id": "s", "timestamp_ms": 1, "values": [1, 2, 3, 4]}', "wrong_shape"),
        (b'{"series_id": "s", "values": [[1, 2, 3], [1, 2, 3]]}', "wrong_shape"),
        (b'{"series_id": "s", "values": [[1, 2, 3], [1, 2], [1, 2, 3], [1, 2, 3]]}', "wrong_shape"),
        (b'{"series_id": "s", "values": [[1, 2, 3], 4, [1, 2, 3], [1, 2, 3]]}', "invalid_timeseries"),
        (b'{"series_id": "s", "timestamp_ms": 1, "values": [1, true, 3]}', "invalid_timeseries"),
        (b'{"series_id": "s", "timestamp_ms": 1, "values": [1, "2", 3]}', "invalid_timeseries"),
        (b'{"series_id": "s", "timestamp_ms": 1, "values": []}', "invalid_timeseries"),
        (b'{"series_id": "s", "values": [1, 2, 3]}', "invalid_timeseries"),
        (b'{"series_id": "s", "timestamp_ms": 1.5, "values": [1, 2, 3]}', "invalid_timeseries"),
        (b'{"series_id": "s", "timestamp_ms": -1, "values": [1, 2, 3]}', "invalid_timeseries"),
        (b'{"series_id": "", "timestamp_ms": 1, "values": [1, 2, 3]}', "invalid_timeseries"),
        (b'{"timestamp_ms": 1, "values": [1, 2, 3]}', "invalid_timeseries"),
        (b'{"series_id": "s", "timestamp_ms": 1, "values": [1, 2, 3], "extra": 1}', "invalid_timeseries"),
        (b'{"series_id": "s", "timestamp_ms": 1, "start_ms": 1, "values": [1, 2, 3]}', "invalid_timeseries"),
        (b'{"series_id": "s", "timestamp_ms": 1, "values": [[1, 2, 3]] }', "invalid_timeseries"),
        (
            b'{"series_id": "s", "start_ms": 5, "end_ms": 4, "values": [[1,2,3],[1,2,3],[1,2,3],[1,2,3]]}',
            "invalid_timeseries",
        ),
        (b'{"series_id": "s", "timestamp_ms": 1, "values": [1, 2, 3], "metadata": 3}', "invalid_timeseries"),
        (b"[" * 100_000, "invalid_timeseries"),
    ],
)
def test_bad_input_is_a_bad_record_with_a_stable_reason(raw, reason):
    out = parse_timeseries(msg(None, raw=raw), 4, 3, 10_000 if reason != "invalid_timeseries" else 200_000)
    assert isinstance(out, BadRecord), out
    assert out.reason == reason, out.message


def test_decode_never_raises_on_arbitrary_bytes():
    rng = np.random.default_rng(0)
    seeds = [b'{"series_id": "s", "timestamp_ms": 1, "values": [1, 2, 3]}', b'{"series_id":"s","values":[[1]]}']
    for _ in range(2000):
        base = bytearray(seeds[int(rng.integers(2))])
        for _ in range(int(rng.integers(1, 4))):
            base[int(rng.integers(len(base)))] = int(rng.integers(256))
        parse_timeseries(msg(None, raw=bytes(base)), 4, 3, 10_000)


# -- windows ----------------------------------------------------------------------------------------


def observations(series, n, start_offset=0, step=1, partition=0, first_ts=0):
    return [
        parse_timeseries(
            msg(obs_doc(series, first_ts + i, (i, i, i)), offset=start_offset + i * step, partition=partition),
            4,
            3,
            1e9,
        )
        for i in range(n)
    ]


def feed(sw, points):
    rows, dead = [], []
    for p in points:
        item, d = sw.add(p)
        dead += d
        if isinstance(item, BadRecord):
            dead.append(item)
        elif item is not None:
            rows.append(item)
    return rows, dead


def test_overlapping_windows_finish_each_point_with_its_last_window():
    sw = SlidingWindows(length=4, stride=2, max_series=10)
    rows, dead = feed(sw, observations("a", 10))
    assert not dead
    assert [w.values[:, 0].tolist() for w in rows] == [[0, 1, 2, 3], [2, 3, 4, 5], [4, 5, 6, 7], [6, 7, 8, 9]]
    assert [[o for _, o in w.covers] for w in rows] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    covered = [o for w in rows for _, o in w.covers]
    assert len(covered) == len(set(covered)), "an offset is finished once"
    for w in rows:  # point i has value i and offset i: a finished point is in no later window
        for _, off in w.covers:
            assert off in w.values[:, 0].tolist()
            later = [r for r in rows if r.end_ms > w.end_ms and off in r.values[:, 0].tolist()]
            assert not later, f"offset {off} finished by a window although a later one contains it"
    assert sw.open_points() == 2  # points 8, 9: in the last window but not finished, they may be in the next
    assert next((w.start_ms, w.end_ms, w.points) for w in rows) == (0, 3, 4)


def test_tumbling_windows_and_a_stride_longer_than_the_window_is_refused():
    sw = SlidingWindows(length=4, stride=4, max_series=10)
    rows, _ = feed(sw, observations("a", 9))
    assert [[o for _, o in w.covers] for w in rows] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert sw.open_points() == 1
    with pytest.raises(ConfigError, match="stride"):
        SlidingWindows(length=4, stride=5, max_series=10)


def test_late_and_duplicate_points_are_dead_lettered_and_skipped():
    sw = SlidingWindows(length=4, stride=4, max_series=10)
    pts = observations("a", 3)
    late = parse_timeseries(msg(obs_doc("a", 1), offset=10), 4, 3, 1e9)
    dup = parse_timeseries(msg(obs_doc("a", 2), offset=11), 4, 3, 1e9)
    nxt = parse_timeseries(msg(obs_doc("a", 7), offset=12), 4, 3, 1e9)
    rows, dead = feed(sw, [*pts, late, dup, nxt])
    assert [(d.reason, d.source.offset) for d in dead] == [("late", 10), ("late", 11)]
    assert [[o for _, o in w.covers] for w in rows] == [[0, 1, 2, 12]]
    assert sw.counters["late"] == 2


def test_lru_eviction_dead_letters_unfinished_points_and_bounds_state():
    sw = SlidingWindows(length=4, stride=2, max_series=2)
    a = observations("a", 5, start_offset=0, step=3)  # offsets 0, 3, 6, 9, 12: one window, 3 points left
    b = observations("b", 2, start_offset=1, step=3)
    c = observations("c", 1, start_offset=100)
    rows, dead = feed(sw, [*a, *b])
    assert len(rows) == 1 and not dead
    b_more = observations("b", 1, start_offset=50, first_ts=10)
    feed(sw, b_more)  # b is now the most recently updated: a is the LRU
    rows, dead = feed(sw, c)
    assert {d.reason for d in dead} == {"evicted"}
    assert sorted(d.source.offset for d in dead) == [6, 9, 12]
    assert "3 unfinished point(s), 2 of them already part of a published window" in dead[0].message
    assert len(sw) == 2 and sw.counters["series_evicted"] == 1 and sw.counters["points_evicted"] == 3
    # A later point of the evicted series starts a new window (no 'late' against forgotten state); being new,
    # it evicts the least recently updated series in turn (b).
    rows, dead = feed(sw, observations("a", 1, start_offset=200))
    assert {d.reason for d in dead} == {"evicted"} and sorted(d.source.offset for d in dead) == [1, 4, 50]


def test_idle_series_are_evicted_by_event_time_not_wall_clock():
    sw = SlidingWindows(length=4, stride=4, max_series=10, idle_evict_ms=100)
    feed(sw, observations("quiet", 2, start_offset=0, first_ts=0))
    _, dead = feed(sw, observations("busy", 1, start_offset=10, first_ts=50))
    assert not dead
    _, dead = feed(sw, observations("busy", 1, start_offset=11, first_ts=200))
    assert sorted(d.source.offset for d in dead) == [0, 1] and {d.reason for d in dead} == {"evicted"}


def test_forget_drops_only_the_lost_partitions():
    sw = SlidingWindows(length=4, stride=4, max_series=10)
    feed(sw, observations("a", 2, partition=0))
    feed(sw, observations("b", 3, partition=1))
    assert sw.forget([TopicPartition(TOPIC, 1)]) == 3
    assert sw.open_points() == 2


# -- the worker loop --------------------------------------------------------------------------------

SPEC_SETTINGS = {"family": "lstm", "arch": "w4c3h6", "weights": "random", "max_batch_size": 32}


def make_worker(records, stride=2, backend=None, **ts):
    settings = load_settings(
        batch={"max_size": 4, "max_wait_ms": 0},
        encoder=SPEC_SETTINGS,
        kafka={"input_topic": TOPIC},
        timeseries={"stride": stride, **ts},
        commit_interval_ms=0,
        worker_id="w-ts",
    )
    spec = get_family("lstm").describe(settings.encoder)
    consumer = FakeConsumer(records, topic=TOPIC)
    producer = FakeProducer()
    modality = modality_for(spec, settings)
    assert isinstance(modality, TimeSeriesModality)
    worker = Worker(settings, modality, backend or FakeBackend(spec), consumer, producer)
    return worker, consumer, producer


def run(worker, consumer, producer, steps=60):
    for _ in range(steps):
        worker.step()
        producer.flush()
        if consumer.drained() and not worker.in_flight_batches and not worker.queued:
            break
    worker.drain()  # publish what is batched and collect every ack; window state stays as it is


def out_rows(producer, topic="embeddings.image"):
    return [r for _, v, _ in producer.sent[topic] for r in decode_embeddings(v).to_pylist()]


def dlq(producer):
    return {int(dict(h)[SOURCE_OFFSET]): dict(h)[REASON].decode() for _, _, h in producer.sent["deadletter.image"]}


def obs_bytes(series, ts, values=(1.0, 2.0, 3.0)):
    return (series.encode(), json.dumps(obs_doc(series, ts, values)).encode())


def test_open_windows_hold_the_commit_point_and_finished_points_release_it():
    # Two series interleaved on one partition, plus bad and late points.
    msgs = []
    for i in range(6):
        msgs.append(obs_bytes("a", i))
        msgs.append(obs_bytes("b", i))
    msgs.insert(3, obs_bytes("a", 100, (1.0, math.nan, 2.0)))  # NaN: stdlib json writes the NaN token
    msgs.insert(5, obs_bytes("b", 100, (1.0, 2.0)))  # wrong channel count
    msgs.append(obs_bytes("a", 2))  # late
    worker, consumer, producer = make_worker({0: msgs})
    run(worker, consumer, producer)
    rows = out_rows(producer)
    assert sorted((r["series_id"], r["points"], r["messages_finished"]) for r in rows) == [
        ("a", 4, 2),
        ("a", 4, 2),
        ("b", 4, 2),
        ("b", 4, 2),
    ]
    assert dlq(producer) == {3: "non_finite", 5: "wrong_shape", 14: "late"}
    # Finished: a0..a3, b0..b3 and the 3 dead letters. Open: a4, a5, b4, b5 -> commit stops at a4.
    offsets = {(k, json.loads(v)["timestamp_ms"]): o for o, (k, v) in enumerate(msgs)}
    assert consumer.committed == {TP0: offsets[(b"a", 4)]}
    assert worker.status()["in_flight"] == 4
    first = min(rows, key=lambda r: (r["series_id"], r["source_offset"]))
    assert first["id"] == "a@3" and first["source_offset"] == offsets[(b"a", 3)]


def test_a_window_message_is_one_row_and_commits_at_once():
    window = {"series_id": "w", "values": [[1, 2, 3]] * 4, "start_ms": 10, "end_ms": 40}
    worker, consumer, producer = make_worker({0: [(b"w", orjson.dumps(window)), obs_bytes("a", 0)]})
    run(worker, consumer, producer)
    (row,) = out_rows(producer)
    assert (row["series_id"], row["messages_finished"], row["points"]) == ("w", 1, 4)
    assert consumer.committed == {TP0: 1}, "the open observation after it holds the commit"


def test_restart_rebuilds_the_open_window_from_the_uncommitted_log():
    msgs = [obs_bytes("a", i) for i in range(7)]
    worker, consumer, producer = make_worker({0: msgs})
    run(worker, consumer, producer)
    before = out_rows(producer)
    committed = consumer.committed[TP0]
    assert committed == 4 and [r["id"] for r in before] == ["a@3", "a@5"]
    # A new worker (crash: nothing drained) reads from the committed offset, and the series goes on.
    more = [*msgs, *(obs_bytes("a", i) for i in range(7, 10))]
    worker2, consumer2, producer2 = make_worker({0: more})
    consumer2.start_at(0, committed)
    run(worker2, consumer2, producer2)
    after = out_rows(producer2)
    assert [r["id"] for r in after] == ["a@7", "a@9"], "the next windows, exactly as without the restart"
    assert [(r["window_start"].timestamp(), r["messages_finished"]) for r in after] == [(0.004, 2), (0.006, 2)]
    assert consumer2.committed == {TP0: 8}


def test_eviction_releases_commits_and_every_message_is_accounted_for_once():
    msgs = [obs_bytes(f"s{i % 5}", i // 5) for i in range(40)]  # 5 series, round robin, 8 points each
    worker, consumer, producer = make_worker({0: msgs}, stride=4, max_series=2)
    run(worker, consumer, producer)
    finished = {}
    for r in out_rows(producer):
        finished[r["id"]] = r["messages_finished"]
    dead = dlq(producer)
    assert set(dead.values()) == {"evicted"}
    open_points = worker.modality.windows.open_points()
    assert sum(finished.values()) + len(dead) + open_points == len(msgs)
    assert consumer.committed[TP0] == len(msgs) - open_points


def test_a_refused_window_dead_letters_once_and_finishes_all_its_points():
    class Refusing(FakeBackend):
        def infer(self, inputs):
            from embedstream.errors import BackendError

            if (inputs[0] == 66).any():
                raise BackendError("INVALID_ARG: refused", retriable=False)
            return super().infer(inputs)

    msgs = [obs_bytes("a", i, (66.0, 1.0, 1.0) if i == 1 else (1.0, 1.0, 1.0)) for i in range(4)]
    settings_spec = get_family("lstm").describe(load_settings(encoder=SPEC_SETTINGS).encoder)
    worker, consumer, producer = make_worker({0: msgs}, stride=4, backend=Refusing(settings_spec))
    run(worker, consumer, producer)
    assert dlq(producer) == {3: "inference_rejected"}
    assert consumer.committed == {TP0: 4}


def test_the_autoencoder_outputs_land_in_model_columns():
    enc = {"family": "autoencoder", "arch": "w4c3h8l2", "weights": "random", "max_batch_size": 32}
    settings = load_settings(
        batch={"max_size": 4, "max_wait_ms": 0}, encoder=enc, kafka={"input_topic": TOPIC}, commit_interval_ms=0
    )
    fam = get_family("autoencoder")
    spec = fam.describe(settings.encoder)
    window = {"series_id": "w", "values": [[1, 2, 3]] * 4}
    consumer = FakeConsumer({0: [(b"w", orjson.dumps(window))]}, topic=TOPIC)
    producer = FakeProducer()
    worker = Worker(
        settings, modality_for(spec, settings), TorchBackend(spec, fam.build(settings.encoder)), consumer, producer
    )
    run(worker, consumer, producer)
    (row,) = out_rows(producer)
    assert row["anomaly"] is False and row["reconstruction_error"] > 0
    assert len(row["embedding"]) == 2


def test_decode_returns_deferred_for_observations_only():
    settings = load_settings(encoder=SPEC_SETTINGS, timeseries={"stride": 4})
    mod = modality_for(get_family("lstm").describe(settings.encoder), settings)
    assert mod.decode(msg(obs_doc("a", 0))) == Deferred(None, ())
    assert isinstance(mod.decode(msg({"series_id": "w", "values": [[1, 2, 3]] * 4})), TimeSeriesWindow)
    assert isinstance(mod.decode(msg(None, raw=b"{")), BadRecord)
