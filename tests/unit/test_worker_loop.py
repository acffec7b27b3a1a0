"""The worker loop against in-memory Kafka and inference stand-ins: offsets, dead letters, poison batches."""

import io
import threading
import time

import numpy as np
import pytest
from kafka.structs import TopicPartition
from PIL import Image

from embedstream.config import load_settings
from embedstream.consume.deadletter import REASON, SOURCE_OFFSET, VALUE_DROPPED
from embedstream.encoders import EncoderSpec, ImagePreprocessing, TensorSpec
from embedstream.modalities.image import ImageModality
from embedstream.sinks.arrow_codec import decode_embeddings
from embedstream.testing import FakeBackend, FakeConsumer, FakeProducer
from embedstream.worker import Worker

SPEC = EncoderSpec(
    name="image-test",
    version="1",
    modality="image",
    family="cnn",
    source="test",
    inputs=(TensorSpec("pixels__0", "UINT8", (16, 16, 3)),),
    outputs=(TensorSpec("embedding__0", "FP32", (6,)),),
    embedding_dim=6,
    max_batch_size=8,
    preprocessing=ImagePreprocessing(16, 16, 16, "bilinear", (0.5,) * 3, (0.5,) * 3),
)


def png(color: int, size=(20, 16)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (color, color, color)).save(buf, format="PNG")
    return buf.getvalue()


def make_worker(records, producer=None, backend=None, clock=time.monotonic, consumer_type=FakeConsumer, **overrides):
    settings = load_settings(
        batch={"max_size": 4, "max_wait_ms": 0, **overrides.pop("batch", {})},
        encoder={"max_batch_size": 8},
        commit_interval_ms=0,
        worker_id="w-test",
        **overrides,
    )
    consumer = consumer_type(records)
    producer = producer or FakeProducer()
    backend = backend or FakeBackend(SPEC)
    return Worker(settings, ImageModality(SPEC, settings), backend, consumer, producer, clock), consumer, producer


def run_until_drained(worker, consumer, steps=50):
    for _ in range(steps):
        worker.step()
        if consumer.drained() and not worker.status()["in_flight"]:
            break
    worker.drain()


def run_until_consumed(worker, consumer):
    """worker.run() as a deployment calls it, stopped once every record has been polled."""
    stop = threading.Event()
    real_step = worker.step

    def step_then_stop():
        real_step()
        if consumer.drained():
            stop.set()

    worker.step = step_then_stop
    worker.run(stop)


def rows(producer, topic="embeddings.image"):
    tables = [decode_embeddings(v) for _, v, _ in producer.sent[topic]]
    return [r for t in tables for r in t.to_pylist()]


def test_all_good_messages_become_rows_and_offsets_are_committed_to_the_end():
    worker, consumer, producer = make_worker({0: [(b"a%d" % i, png(i)) for i in range(7)], 1: [(b"b", png(50))]})
    run_until_drained(worker, consumer)
    out = rows(producer)
    assert sorted(r["key"] for r in out) == sorted([b"a%d" % i for i in range(7)] + [b"b"])
    assert consumer.committed == {TopicPartition("images", 0): 7, TopicPartition("images", 1): 1}
    first = next(r for r in out if r["key"] == b"a3")
    np.testing.assert_allclose(first["embedding"], [3.0] * 6)
    assert first["source_width"] == 20 and first["source_height"] == 16


def test_nothing_is_committed_before_the_broker_acknowledges():
    worker, consumer, producer = make_worker({0: [(b"k%d" % i, png(i)) for i in range(4)]})
    for _ in range(500):  # inference runs on a thread: step until its result is published
        worker.step()
        if producer.sent["embeddings.image"]:
            break
        time.sleep(0.002)
    assert producer.sent["embeddings.image"], "the batch was published"
    assert consumer.committed == {}, "but not acknowledged, so not committed"
    producer.flush()
    worker.step()
    assert consumer.committed == {TopicPartition("images", 0): 4}


def test_bad_input_goes_to_dead_letters_and_neighbours_still_flow():
    msgs = [(b"g0", png(1)), (b"bad", b"garbage"), (b"g1", png(2)), (b"empty", b"")]
    worker, consumer, producer = make_worker({0: msgs})
    run_until_drained(worker, consumer)
    assert sorted(r["key"] for r in rows(producer)) == [b"g0", b"g1"]
    dlq = {k: dict(h) for k, _, h in producer.sent["deadletter.image"]}
    assert dlq[b"bad"][REASON] == b"undecodable" and dlq[b"bad"][SOURCE_OFFSET] == b"1"
    assert dlq[b"empty"][REASON] == b"empty"
    assert consumer.committed == {TopicPartition("images", 0): 4}


def test_a_poison_record_refused_by_the_model_is_isolated_and_the_rest_embedded():
    msgs = [(b"k%d" % i, png(i * 10)) for i in range(8)]
    msgs[5] = (b"poison", png(77))
    backend = FakeBackend(SPEC, poison_value=77)
    worker, consumer, producer = make_worker({0: msgs}, backend=backend)
    run_until_drained(worker, consumer)
    assert sorted(r["key"] for r in rows(producer)) == sorted(k for k, _ in msgs if k != b"poison")
    ((key, _, headers),) = producer.sent["deadletter.image"]
    assert key == b"poison" and dict(headers)[REASON] == b"inference_rejected"
    assert consumer.committed == {TopicPartition("images", 0): 8}


def test_a_failed_write_stops_the_worker_without_committing():
    from embedstream.errors import DeliveryError

    producer = FakeProducer(fail_topics={"embeddings.image"})
    worker, consumer, producer = make_worker({0: [(b"k", png(1))]}, producer=producer)
    with pytest.raises(DeliveryError):
        run_until_drained(worker, consumer)
    assert consumer.committed == {}


def test_dead_letter_too_large_to_republish_keeps_coordinates_not_bytes():
    big = b"\xff\xd8" + b"x" * 40_000
    worker, consumer, producer = make_worker(
        {0: [(b"big", big)]},
        kafka={"producer_max_request_bytes": 50_000},
        limits={"max_message_bytes": 1_000},
    )
    run_until_drained(worker, consumer)
    ((_, value, headers),) = producer.sent["deadletter.image"]
    assert value == b"" and dict(headers)[VALUE_DROPPED] == str(len(big)).encode()
    assert dict(headers)[REASON] == b"oversize"


def test_run_stops_on_request_and_commits_everything_done():
    worker, consumer, producer = make_worker({0: [(b"k%d" % i, png(i)) for i in range(10)]})
    producer.ack_immediately = True
    run_until_consumed(worker, consumer)
    assert consumer.closed
    assert consumer.committed == {TopicPartition("images", 0): 10}
    assert len(rows(producer)) == 10


def test_a_message_pinned_to_another_model_is_dead_lettered():
    msgs = [(b"ok", png(1)), (b"pinned-ok", png(2)), (b"other", png(3)), (b"old", png(4))]
    pins = {b"pinned-ok": b"image-test:1", b"other": b"image-clip", b"old": b"image-test:0"}

    class Pinning(FakeConsumer):
        def poll(self, timeout_ms=0, max_records=None):
            polled = super().poll(timeout_ms, max_records)
            for rec in (r for recs in polled.values() for r in recs):
                rec.headers = [("embedstream.model", pins[rec.key])] if rec.key in pins else []
            return polled

    worker, consumer, producer = make_worker({0: msgs}, consumer_type=Pinning)
    run_until_drained(worker, consumer)
    assert sorted(r["key"] for r in rows(producer)) == [b"ok", b"pinned-ok"]
    reasons = {k: dict(h)[REASON] for k, _, h in producer.sent["deadletter.image"]}
    assert reasons == {b"other": b"unknown_model", b"old": b"unknown_model"}


def _stepped(worker, steps=20):
    for _ in range(steps):
        worker.step()
        time.sleep(0.002)  # inference runs on a thread


def test_with_a_free_slot_a_partial_batch_goes_at_once_instead_of_waiting_out_max_wait():
    # A frozen clock: nothing ever becomes due by age, so only the free-slot rule can send the lone message.
    backend = FakeBackend(SPEC)
    worker, _, producer = make_worker(
        {0: [(b"only", png(9))]}, backend=backend, clock=lambda: 0.0, batch={"max_wait_ms": 60_000}
    )
    _stepped(worker)
    assert backend.calls == [1]
    assert [r["key"] for r in rows(producer)] == [b"only"]


def test_without_early_dispatch_a_partial_batch_waits_for_max_wait():
    now = [0.0]
    backend = FakeBackend(SPEC)
    worker, _, _ = make_worker(
        {0: [(b"a", png(1)), (b"b", png(2))]},
        backend=backend,
        clock=lambda: now[0],
        batch={"max_wait_ms": 50, "dispatch_when_free": False},
    )
    _stepped(worker)
    assert backend.calls == [], "2 of 4 and only 0 ms old: not due"
    now[0] = 0.05
    _stepped(worker)
    assert backend.calls == [2]


def test_images_of_one_poll_are_decoded_on_several_threads_in_their_order():
    msgs = [(b"k%d" % i, png(i * 20)) for i in range(8)]
    msgs[3] = (b"bad", b"not an image")
    worker, consumer, producer = make_worker({0: msgs}, batch={"decode_threads": 4})
    run_until_drained(worker, consumer)
    out = rows(producer)
    assert [r["key"] for r in out] == [k for k, _ in msgs if k != b"bad"]
    for r in out:  # each row carries its own image's pixels, not a neighbour's
        np.testing.assert_allclose(r["embedding"][0], int(r["key"][1:]) * 20)
    assert [k for k, _, _ in producer.sent["deadletter.image"]] == [b"bad"]


def test_every_inference_thread_connects_before_the_worker_joins_its_group():
    events = []

    class Recording(FakeBackend):
        def connect(self):
            events.append(("connect", threading.current_thread().name))

    worker, consumer, producer = make_worker(
        {0: [(b"k0", png(1))]}, backend=Recording(SPEC), batch={"max_in_flight": 3}
    )
    producer.ack_immediately = True
    real_subscribe = consumer.subscribe

    def subscribe(topics, listener=None):
        events.append(("subscribe", None))
        real_subscribe(topics, listener)

    consumer.subscribe = subscribe
    run_until_consumed(worker, consumer)
    assert events[-1] == ("subscribe", None)
    threads = {name for kind, name in events if kind == "connect"}
    assert len(threads) == 3 and all(name.startswith("infer") for name in threads)
    assert len(rows(producer)) == 1


def test_a_failing_warm_up_does_not_stop_the_worker():
    class Flaky(FakeBackend):
        def connect(self):
            raise ConnectionError("refused")

    worker, consumer, producer = make_worker({0: [(b"k0", png(1))]}, backend=Flaky(SPEC))
    producer.ack_immediately = True
    run_until_consumed(worker, consumer)
    assert len(rows(producer)) == 1
