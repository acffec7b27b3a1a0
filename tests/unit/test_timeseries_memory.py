"""Time-series state bounded in bytes: the accounting against tracemalloc, the bound, id/key/header caps."""

from __future__ import annotations

import dataclasses
import gc
import tracemalloc

import orjson
import pytest
from kafka.structs import TopicPartition

from embedstream.config import Settings, load_settings
from embedstream.encoders import get_family
from embedstream.modalities import modality_for
from embedstream.modalities._windows import SlidingWindows, point_bytes
from embedstream.modalities.timeseries import Observation, TimeSeriesModality, parse_timeseries
from embedstream.records import BadRecord, SourceMessage

TOPIC = "ts"
LENGTH, CHANNELS = 8, 3


def message(series: str, ts: int, offset: int, pad: int = 0, headers=(), key: bytes | None = None) -> SourceMessage:
    doc: dict = {"series_id": series, "timestamp_ms": ts, "values": [1.0, 2.0, 3.0]}
    if pad:
        doc["metadata"] = {"pad": "p" * pad}
    # bytes(bytearray(...)): an exact-size value, as the Kafka client hands over (orjson over-allocates).
    value = bytes(bytearray(orjson.dumps(doc)))
    return SourceMessage(TOPIC, 0, offset, series.encode() if key is None else key, value, 1_000 + offset, headers)


def observe(m: SourceMessage, **caps) -> Observation | BadRecord:
    return parse_timeseries(m, LENGTH, CHANNELS, 1 << 20, **caps)


@pytest.mark.parametrize(
    ("series", "points", "id_pad", "pad", "headers"),
    [
        (100, 6, 0, 0, 0),  # many points per series, tiny messages: object overheads dominate
        (1500, 1, 0, 0, 0),  # one point per series: the per-series costs dominate
        (200, 3, 900, 2000, 2),  # long ids, padded values, headers
        (40, 5, 0, 40_000, 0),  # large raw values
    ],
)
def test_accounted_state_is_what_python_really_holds(series, points, id_pad, pad, headers):
    sw = SlidingWindows(length=LENGTH, stride=LENGTH, max_series=10**6)  # no eviction, no window completes
    hdrs = tuple((f"h{i}", b"v" * 50) for i in range(headers))
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        offset = 0
        for s in range(series):
            sid = f"s{s:05d}" + "x" * id_pad
            for t in range(points):
                obs = observe(message(sid, t, offset, pad, hdrs))
                assert isinstance(obs, Observation), obs
                sw.add(obs)
                offset += 1
        del obs
        gc.collect()
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    ratio = sw.state_bytes / held
    print(f"{series} series x {points} points: held {held} B, accounted {sw.state_bytes} B ({ratio:.2f})")
    assert 0.9 <= ratio <= 1.3, (held, sw.state_bytes)


def test_emitting_evicting_and_forgetting_give_back_exactly_what_was_counted():
    sw = SlidingWindows(length=4, stride=2, max_series=2)
    assert sw.state_bytes == 0
    offset = 0
    for s in "abc":
        for t in range(5):
            obs = observe(message(s, t, offset, pad=100))
            assert isinstance(obs, Observation)
            sw.add(obs)
            offset += 1
    # a was evicted (max_series=2); b and c each emitted one window and hold 3 points.
    held = sum(st.bytes for st in sw._series.values())
    assert sw.state_bytes == held > 0
    assert all(st.bytes > sum(point_bytes(p) for p in st.points) for st in sw._series.values())
    sw.forget([TopicPartition(TOPIC, 0)])
    assert sw.state_bytes == 0 and len(sw) == 0


def test_over_max_state_bytes_the_least_recent_series_are_evicted_and_the_bound_holds():
    limit = 200_000
    sw = SlidingWindows(length=LENGTH, stride=LENGTH, max_series=10**6, max_state_bytes=limit)
    added, dead = 0, []
    for i in range(300):  # every message a new series with a ~5 KB value: 1.5 MB offered
        obs = observe(message(f"series-{i}", i, i, pad=5000))
        assert isinstance(obs, Observation)
        window, evicted = sw.add(obs)
        assert window is None
        dead += evicted
        added += 1
        assert sw.state_bytes <= limit
    assert sw.peak_state_bytes > limit, "the bound was reached, so eviction did the bounding"
    assert {d.reason for d in dead} == {"evicted"}
    assert "held state over max_state_bytes=200000" in dead[0].message
    assert [d.source.offset for d in dead] == list(range(len(dead))), "oldest series first"
    assert sw.open_points() + len(dead) == added, "every point is held or dead-lettered"
    assert sw.counters["series_evicted"] == len(dead)


def test_a_single_series_over_the_bound_is_evicted_too():
    sw = SlidingWindows(length=LENGTH, stride=LENGTH, max_series=10, max_state_bytes=20_000)
    dead = []
    for t in range(5):
        obs = observe(message("big", t, t, pad=6000))
        assert isinstance(obs, Observation)
        dead += sw.add(obs)[1]
        assert sw.state_bytes <= 20_000
    assert dead and {d.reason for d in dead} == {"evicted"}


@pytest.mark.parametrize(
    ("series", "key", "headers", "reason"),
    [
        ("s" * 1025, b"k", (), "oversize_id"),
        ("é" * 513, b"k", (), "oversize_id"),  # 1026 bytes of UTF-8 in 513 characters
        ("s", b"k" * 1025, (), "oversize_id"),
        ("s", b"k", (("trace", b"t" * 16_380),), "oversize_headers"),
        ("s" * 1024, b"k" * 1024, (("trace", b"t" * 16_379),), None),  # each exactly at its cap
        ("é" * 512, b"k", (), None),
    ],
)
def test_ids_keys_and_headers_are_capped_before_anything_is_held(series, key, headers, reason):
    out = observe(message(series, 1, 0, headers=headers, key=key), max_id_bytes=1024, max_header_bytes=16 * 1024)
    if reason is None:
        assert isinstance(out, Observation), out
    else:
        assert isinstance(out, BadRecord) and out.reason == reason, out
        assert "max_id_bytes" in out.message or "max_header_bytes" in out.message


def test_the_modality_takes_its_caps_and_byte_bound_from_the_settings():
    defaults = Settings().timeseries
    assert (defaults.max_id_bytes, defaults.max_header_bytes, defaults.max_state_bytes) == (1024, 16384, 64 << 20)
    settings = load_settings(
        encoder={"family": "lstm", "arch": "w4c3h6", "weights": "random", "max_batch_size": 32},
        kafka={"input_topic": TOPIC},
        timeseries={"max_state_bytes": 50_000, "max_id_bytes": 16},
    )
    modality = modality_for(get_family("lstm").describe(settings.encoder), settings)
    assert isinstance(modality, TimeSeriesModality) and modality.windows.max_state_bytes == 50_000
    bad = modality.decode(message("a-series-id-of-more-than-16-bytes", 1, 0, key=b"k"))
    assert isinstance(bad, BadRecord) and bad.reason == "oversize_id"


def test_a_rewritten_registry_record_counts_the_bytes_it_was_consumed_as() -> None:
    plain = message("s1", 1, 0)
    consumed = SourceMessage(TOPIC, 0, 0, b"s1", bytes(5_000), 1_000)  # e.g. an Avro record, framed
    rewritten = dataclasses.replace(plain, origin=consumed, schema_id=7)
    without, with_origin = observe(plain), observe(rewritten)
    assert isinstance(without, Observation) and isinstance(with_origin, Observation)
    assert point_bytes(with_origin) - point_bytes(without) >= len(consumed.value)
