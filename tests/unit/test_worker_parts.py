"""The worker's parts on their own: dispatcher, Kafka sink, delivery."""

import threading
from types import SimpleNamespace

import numpy as np
import pytest
from kafka.structs import TopicPartition

from embedstream.config import load_settings
from embedstream.consume.deadletter import REASON, VALUE_DROPPED
from embedstream.consume.delivery import AtLeastOnce, ExactlyOnce, delivery_for
from embedstream.consume.dispatch import Dispatcher
from embedstream.consume.offsets import OffsetTracker
from embedstream.errors import DeliveryError
from embedstream.modalities.image import ImageModality
from embedstream.records import BadRecord, SourceMessage
from embedstream.sinks.arrow_codec import decode_embeddings
from embedstream.sinks.kafka import KafkaSink
from embedstream.testing import FakeBackend, FakeProducer
from embedstream.worker import EmbedStage

from .test_worker_loop import SPEC, png

TP0 = TopicPartition("images", 0)
TP1 = TopicPartition("images", 1)


class Values:
    """A modality whose items are ints: each becomes a one-pixel image of that value."""

    name = "image"

    def prepare(self, items):
        return items

    def stack(self, items):
        return (np.stack([np.full((1, 1, 3), v, np.uint8) for v in items]),)


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def dispatcher(backend, max_in_flight=2, clock=None, events=None):
    events = [] if events is None else events
    return Dispatcher(
        EmbedStage(Values(), backend, sink=None),  # the dispatcher never publishes
        max_in_flight,
        clock or Clock(),
        lambda: events.append("down"),
        lambda: events.append("up"),
    )


def parts(results):
    return [part for r in results for part, _ in r.ok]


# -- dispatcher ------------------------------------------------------------------------------------


def test_a_refused_batch_is_halved_until_the_refused_item_is_alone():
    backend = FakeBackend(SPEC, poison_value=77)
    d = dispatcher(backend)
    items = [0, 10, 20, 30, 40, 77, 60, 70]
    assert d.submit(items) == []
    (result,) = d.reap(block=True)
    assert [v for part, _ in result.ok for v in part] == [0, 10, 20, 30, 40, 60, 70]
    assert [item for item, _ in result.rejected] == [77]
    assert "INVALID_ARG" in result.rejected[0][1]
    assert backend.calls == [8, 4, 4, 2, 1, 1, 2]


def test_batches_come_back_in_submission_order_and_at_most_max_in_flight_wait():
    gates = {v: threading.Event() for v in (1, 2, 3)}

    class Gated(FakeBackend):
        def infer(self, inputs):
            gates[int(inputs[0][0, 0, 0, 0])].wait(5)
            return super().infer(inputs)

    d = dispatcher(Gated(SPEC), max_in_flight=2)
    assert d.submit([1]) == [] and d.submit([2]) == []
    gates[2].set()
    assert d.reap(block=False) == [], "the oldest batch is still at the backend"
    assert not d.slot_free
    gates[1].set()
    assert parts(d.submit([3])) == [[1]], "a full dispatcher finishes its oldest batch to make room"
    assert d.in_flight_batches == 2
    gates[3].set()
    assert parts(d.reap(block=True)) == [[2], [3]]
    assert d.in_flight_batches == 0 and d.slot_free


def test_an_unavailable_backend_holds_batches_until_a_probe_finds_it_back():
    clock, events = Clock(), []
    backend = FakeBackend(SPEC)
    backend.down = True
    d = dispatcher(backend, clock=clock, events=events)
    d.submit([1])
    assert d.reap(block=True) == []
    assert events == ["down"] and d.degraded and "UNAVAILABLE" in d.degraded_reason
    calls = len(backend.calls)
    assert d.submit([2, 3]) == [] and len(backend.calls) == calls, "held, not sent"
    assert d.held_messages == 3 and not d.slot_free
    assert d.probe() == [], "no probe before it is due"
    clock.now = 0.5
    assert d.probe() == [] and d.degraded, "still down: the probe backs off"
    backend.down = False
    clock.now = 1.0
    assert d.probe() == [] and d.degraded, "the next probe is a second after the failed one"
    clock.now = 1.5
    d.probe()
    assert events == ["down", "up"] and not d.degraded
    assert parts(d.reap(block=True)) == [[1], [2, 3]]


# -- Kafka sink ------------------------------------------------------------------------------------


def sink_for(producer, **kafka):
    settings = load_settings(
        batch={"max_size": 8},
        encoder={"max_batch_size": 8},
        limits={"max_message_bytes": 1_000},
        worker_id="w-sink",
        kafka=kafka,
    )
    modality = ImageModality(SPEC, settings)
    return KafkaSink(settings, modality, SPEC, producer, OffsetTracker()), modality


def decoded(modality, tracker, partition, offset, color):
    msg = SourceMessage("images", partition, offset, b"k%d-%d" % (partition, offset), png(color), 1_000)
    tracker.track(TopicPartition("images", partition), offset)
    return modality.decode(msg)


def test_a_batch_leaves_as_one_message_per_partition_and_acks_finish_its_offsets():
    producer = FakeProducer()
    sink, modality = sink_for(producer)
    items = [decoded(modality, sink.tracker, p, o, 10 * p + o) for p, o in [(0, 0), (1, 0), (0, 1), (1, 1), (0, 2)]]
    embeddings = np.arange(5 * 6, dtype=np.float32).reshape(5, 6)
    assert sink.publish(items, {SPEC.embedding_output.name: embeddings}) == 2
    sent = producer.sent["embeddings.image"]
    assert [key for key, _, _ in sent] == [b"images/0", b"images/1"]
    assert [dict(h)["embedstream.rows"] for _, _, h in sent] == [b"3", b"2"]
    first = decode_embeddings(sent[0][1]).to_pylist()
    assert [r["source_offset"] for r in first] == [0, 1, 2]
    np.testing.assert_allclose(first[1]["embedding"], embeddings[2], err_msg="embeddings follow their rows")
    sink.collect_acks(block=False)
    assert sink.pending == 2 and sink.tracker.committable() == {}, "nothing finished before the broker acks"
    sink.collect_acks(block=True)
    assert sink.pending == 0 and sink.acked == 2
    assert sink.tracker.committable() == {TP0: 3, TP1: 2}


def test_a_dead_letter_too_large_to_republish_keeps_its_coordinates_and_covers_what_it_stands_for():
    producer = FakeProducer()
    sink, _ = sink_for(producer, producer_max_request_bytes=70_000)
    for offset in range(3):
        sink.tracker.track(TP0, offset)
    big = SourceMessage("images", 0, 2, b"big", b"x" * 10_000, 1_000)
    sink.dead_letter(BadRecord(big, "oversize", "too big"), covers=[(TP0, 0), (TP0, 1), (TP0, 2)])
    ((key, value, headers),) = producer.sent["deadletter.image"]
    assert key == b"big" and value == b"" and dict(headers)[VALUE_DROPPED] == b"10000"
    assert dict(headers)[REASON] == b"oversize"
    sink.collect_acks(block=True)
    assert sink.tracker.committable() == {TP0: 3}


def test_a_refused_send_raises_and_finishes_nothing():
    producer = FakeProducer(fail_topics={"deadletter.image"})
    sink, _ = sink_for(producer)
    sink.tracker.track(TP0, 0)
    sink.dead_letter(BadRecord(SourceMessage("images", 0, 0, None, b"", 1_000), "empty", "empty"))
    with pytest.raises(DeliveryError):
        sink.collect_acks(block=True)
    assert sink.tracker.committable() == {}


# -- delivery --------------------------------------------------------------------------------------


class Recording:
    """Stands for the consumer and the producer: records the calls a commit makes, in order."""

    def __init__(self):
        self.calls = []

    def commit(self, offsets):
        self.calls.append(("commit", {tp: om.offset for tp, om in offsets.items()}))

    def init_transactions(self):
        self.calls.append("init_transactions")

    def begin_transaction(self):
        self.calls.append("begin_transaction")

    def send_offsets_to_transaction(self, offsets, group_id):
        self.calls.append(("send_offsets_to_transaction", {tp: om.offset for tp, om in offsets.items()}, group_id))

    def commit_transaction(self):
        self.calls.append("commit_transaction")


def test_at_least_once_settles_without_waiting_then_commits_what_was_finished():
    client, tracker = Recording(), OffsetTracker()
    tracker.track(TP0, 0)
    tracker.track(TP0, 1)

    def settle(block):
        client.calls.append(("settle", block))
        tracker.done(TP0, 0)

    delivery = AtLeastOnce(client, tracker)
    delivery.begin()
    assert delivery.commit(settle)
    assert client.calls == [("settle", False), ("commit", {TP0: 1})]
    client.calls.clear()
    assert not delivery.commit(lambda block: None) and client.calls == [], "nothing new: no commit"


def test_exactly_once_waits_for_acks_then_commits_offsets_in_the_transaction_and_begins_the_next():
    client = Recording()
    sink = SimpleNamespace(tracker=OffsetTracker(), acked=0)
    sink.tracker.track(TP0, 0)

    def settle(block):
        client.calls.append(("settle", block))
        sink.tracker.done(TP0, 0)
        sink.acked += 1

    delivery = ExactlyOnce(client, sink, lambda: "g-eos")
    delivery.begin()
    assert delivery.commit(settle)
    assert client.calls == [
        "init_transactions",
        "begin_transaction",
        ("settle", True),
        ("send_offsets_to_transaction", {TP0: 1}, "g-eos"),
        "commit_transaction",
        "begin_transaction",
    ]
    client.calls.clear()
    assert not delivery.commit(lambda block: None) and client.calls == [], "nothing sent: no empty transaction"
    sink.acked += 1  # e.g. a dead letter of a point whose offsets stay open behind an earlier one
    assert delivery.commit(lambda block: None)
    assert client.calls == ["commit_transaction", "begin_transaction"]


def test_the_delivery_follows_the_setting():
    producer = FakeProducer()
    sink, _ = sink_for(producer)
    for mode, kind in [("at_least_once", AtLeastOnce), ("exactly_once", ExactlyOnce)]:
        kafka = load_settings(kafka={"delivery": mode}).kafka
        assert isinstance(delivery_for(kafka, Recording(), producer, sink), kind)


def test_rebalance_steps_run_off_the_consumer_io_thread_and_their_errors_reach_the_coordinator():
    import threading

    from kafka.structs import TopicPartition

    from embedstream.consume.rebalance import RebalanceListener
    from embedstream.testing import call_listener

    seen = []

    class Steps:
        def on_revoked(self, partitions):
            seen.append(("revoked", threading.current_thread().name, partitions))

        def on_assigned(self, partitions):
            raise RuntimeError("cannot take them")

    listener = RebalanceListener(Steps(), consumer=object())
    tp = TopicPartition("t", 0)
    call_listener(listener.on_partitions_revoked, [tp])
    assert seen == [("revoked", "rebalance", [tp])]
    with pytest.raises(RuntimeError, match="cannot take them"):
        call_listener(listener.on_partitions_assigned, [tp])


def test_librdkafka_client_gets_the_same_connection_settings_in_its_own_names():
    from pydantic import SecretStr

    from embedstream.config import KafkaSettings
    from embedstream.kafka_librdkafka import rd_config

    k = KafkaSettings(
        bootstrap_servers="127.0.0.1:9093",
        security_protocol="SASL_SSL",
        sasl_mechanism="SCRAM-SHA-512",
        sasl_username="embed",
        sasl_password=SecretStr("s3cret"),
        ssl_cafile="/etc/ca.pem",
    )
    conf = rd_config(k, "w-1")
    assert conf["bootstrap.servers"] == "127.0.0.1:9093"
    assert conf["security.protocol"] == "sasl_ssl"
    sasl = (conf["sasl.mechanisms"], conf["sasl.username"], conf["sasl.password"])
    assert sasl == ("SCRAM-SHA-512", "embed", "s3cret")
    assert conf["ssl.ca.location"] == "/etc/ca.pem"
    assert "ssl.certificate.location" not in conf
    assert rd_config(KafkaSettings(), "w")["security.protocol"] == "plaintext"


def test_the_loop_client_follows_kafka_client(monkeypatch):
    from embedstream import kafka_io
    from embedstream.config import KafkaSettings
    from embedstream.kafka_librdkafka import LoopConsumer, LoopProducer

    # librdkafka builds its clients without connecting, so no broker is needed to see which one is made.
    k = KafkaSettings(client="librdkafka", bootstrap_servers="127.0.0.1:1")
    member, sender = kafka_io.make_member(k, "w"), kafka_io.make_sender(k, "w")
    assert isinstance(member, LoopConsumer) and isinstance(sender, LoopProducer)
    member.close()
