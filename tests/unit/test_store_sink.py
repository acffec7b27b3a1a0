"""The store sink on the consume loop: upserts, dead letters, commits after the store's ack, outages held."""

from __future__ import annotations

import time

import numpy as np
import pyarrow as pa
from kafka.structs import TopicPartition

from embedstream.config import load_settings
from embedstream.consume.deadletter import REASON
from embedstream.errors import StoreUnavailable
from embedstream.stores.base import KEY_COLUMNS, Refusal, check_rows
from embedstream.stores.sample_rows import sample_messages
from embedstream.stores.sink import StoreSink
from embedstream.testing import FakeConsumer, FakeProducer

TOPIC = "embeddings.image"
TP0 = TopicPartition(TOPIC, 0)


class MemoryStore:
    """A store in a dict, keyed like every store; ``down`` makes writes fail as an unreachable store's do."""

    name = "memory"

    def __init__(self) -> None:
        self.rows: dict[tuple[object, ...], np.ndarray] = {}
        self.down = False
        self.writes = 0

    def admit(self, table: pa.Table) -> pa.Table | Refusal:
        return check_rows(table) or table

    def write(self, tables: list[pa.Table]) -> int:
        self.writes += 1
        if self.down:
            raise StoreUnavailable("memory store: connection refused")
        n = 0
        for t in tables:
            keys = zip(*(t.column(c).to_pylist() for c in KEY_COLUMNS), strict=True)
            for key, vec in zip(keys, t.column("embedding").to_pylist(), strict=True):
                self.rows[key] = np.asarray(vec, np.float32)
                n += 1
        return n

    def close(self) -> None:
        return None


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def make_sink(records, store=None, clock=None):
    settings = load_settings(
        worker_id="sink-test",
        sink={"topics": [TOPIC], "batch_rows": 64, "max_wait_ms": 0, "retry_backoff_s": 0.5, "max_backoff_s": 4},
        commit_interval_ms=0,
    )
    consumer, producer = FakeConsumer(records, topic=TOPIC), FakeProducer(ack_immediately=True)
    store = store or MemoryStore()
    sink = StoreSink(settings, store, consumer, producer, clock or Clock())
    consumer.subscribe([TOPIC], listener=None)
    sink.loop.on_assigned([TP0])
    return sink, store, consumer, producer


def step_until(sink, done, steps=400):
    """Step the loop (the fake consumer never waits) until ``done``, giving the store-write thread time."""
    for _ in range(steps):
        sink.step()
        if done():
            return True
        time.sleep(0.005)
    return False


def test_rows_are_stored_bad_messages_dead_lettered_and_offsets_committed_after_the_store_ack():
    messages = sample_messages(100, 10, 8, model_name="m")
    nan = sample_messages(2, 2, 8, model_name="m", id_prefix="nan")[0]
    vectors = nan.vectors.copy()
    vectors[0, 0] = np.nan
    from embedstream.records import RowMeta
    from embedstream.sinks.arrow_codec import encode_batch, output_schema

    metas = [
        RowMeta(i.encode(), i, "images", 0, j, 0, {"source_width": 1, "source_height": 1})
        for j, i in enumerate(nan.ids)
    ]
    nan_value = encode_batch(output_schema("image", "m", "1", 8), metas, vectors)
    records = [(m.key, m.value) for m in messages[:5]] + [(b"junk", b"not arrow"), (b"empty", b""), (b"nan", nan_value)]
    records += [(m.key, m.value) for m in messages[5:]]
    sink, store, consumer, producer = make_sink({0: records})
    assert step_until(sink, lambda: consumer.committed.get(TP0) == len(records))
    sink.drain()
    want = {(i, "m", "1"): v for m in messages for i, v in zip(m.ids, m.vectors, strict=True)}
    assert sorted(store.rows) == sorted(want)
    assert all(np.array_equal(store.rows[k], want[k]) for k in want)  # stored copies of the published floats
    reasons = [dict(h)[REASON].decode() for _, _, h in producer.sent["deadletter.sink.memory"]]
    assert reasons == ["undecodable", "empty", "non_finite"]
    assert sink.status()["dead_lettered"] == 3 and sink.stats.rows_stored == 100


def test_a_failing_store_holds_the_batch_pauses_and_commits_nothing_past_it_until_it_is_back():
    messages = sample_messages(40, 10, 8, model_name="m", seed=1)
    clock = Clock()
    store = MemoryStore()
    sink, store, consumer, producer = make_sink({0: [(m.key, m.value) for m in messages]}, store, clock)
    store.down = True
    assert step_until(sink, lambda: sink.status()["degraded"])
    assert consumer.paused() == {TP0} and consumer.committed.get(TP0, 0) == 0
    assert "connection refused" in sink.status()["degraded_reason"] and not sink.status()["ready"]
    writes = store.writes
    clock.now = 0.5  # the first probe retries the held write, which fails again: the same outage, backing off
    assert step_until(sink, lambda: store.writes == writes + 1 and sink.loop.in_flight_batches == 0)
    sink.step()
    assert sink.status()["degraded"] and sink.stats.outages == 1 and consumer.paused() == {TP0}
    clock.now = 1.4  # the next retry waits twice as long (1 s after the failed one)
    for _ in range(5):
        sink.step()
    assert store.writes == writes + 1
    store.down = False
    clock.now = 1.6
    assert step_until(sink, lambda: consumer.committed.get(TP0) == 4)
    assert not sink.status()["degraded"] and consumer.paused() == set()
    assert len(store.rows) == 40 and sink.stats.outages == 1
    assert not producer.sent.get("deadletter.sink.memory")


def test_a_registered_store_is_a_sink_subcommand_and_opens_from_the_settings(monkeypatch, capsys):
    import pytest

    from embedstream.cli import main
    from embedstream.errors import ConfigError
    from embedstream.stores import registry

    assert [k.name for k in registry.store_kinds()] == ["feast", "lancedb"]  # found by their modules
    monkeypatch.setattr(registry, "_STORES", dict(registry._STORES))
    kind = registry.register_store(registry.StoreKind("memory", "rows in a dict, for tests", lambda s: MemoryStore()))
    assert isinstance(registry.store_kind("memory").open(load_settings()), MemoryStore)
    with pytest.raises(SystemExit) as exited:
        main(["sink", "--help"])
    assert exited.value.code == 0 and "rows in a dict, for tests" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="registered twice"):
        registry.register_store(registry.StoreKind("memory", "another", lambda s: MemoryStore()))
    assert registry.register_store(kind) is kind  # a module imported again registers the same kind
    with pytest.raises(ConfigError, match="unknown store 'nosuch'"):
        registry.store_kind("nosuch")
