"""Backend outages: pause, hold, probe with backoff, resume; never commit what was not embedded."""

import time

from kafka.structs import TopicPartition

from embedstream.config import load_settings
from embedstream.consume.outage import OutageGate
from embedstream.modalities.image import ImageModality
from embedstream.testing import FakeBackend, FakeConsumer, FakeProducer
from embedstream.worker import Worker

from .test_worker_loop import SPEC, png, rows, run_until_consumed

TP0 = TopicPartition("images", 0)


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def make(records, clock, in_flight=2):
    settings = load_settings(
        batch={"max_size": 4, "max_wait_ms": 0, "max_in_flight": in_flight},
        encoder={"max_batch_size": 8},
        commit_interval_ms=0,
        worker_id="w",
    )
    backend = FakeBackend(SPEC)
    producer = FakeProducer(ack_immediately=True)
    consumer = FakeConsumer(records)
    worker = Worker(settings, ImageModality(SPEC, settings), backend, consumer, producer, clock=clock)
    consumer.subscribe(["images"], listener=None)
    worker.on_assigned(sorted(consumer.assignment()))
    return worker, consumer, producer, backend


def step_until(worker, cond, clock=None, tick=0.0, n=400):
    for _ in range(n):
        worker.step()
        if clock is not None:
            clock.now += tick
        if cond():
            return True
        time.sleep(0.002)
    return False


def test_backend_down_pauses_holds_and_resumes_without_loss():
    clock = Clock()
    worker, consumer, producer, backend = make({0: [(b"k%d" % i, png(i)) for i in range(12)]}, clock)
    backend.down = True
    assert step_until(worker, lambda: worker.status()["degraded"])
    assert consumer.paused() == {TP0}
    assert worker.status()["ready"] is False
    assert consumer.committed.get(TP0, 0) == 0, "nothing embedded, nothing committed"

    # Probes while still down back off and keep the partitions paused.
    clock.now += 1.0
    worker.step()
    assert worker.status()["degraded"] and consumer.paused() == {TP0}

    backend.down = False
    assert step_until(worker, lambda: consumer.committed.get(TP0) == 12, clock=clock, tick=0.5)
    assert not worker.status()["degraded"] and consumer.paused() == set()
    assert sorted(r["key"] for r in rows(producer)) == sorted(b"k%d" % i for i in range(12))
    assert worker.stats.outages == 1


def test_shutdown_during_an_outage_commits_only_what_was_embedded():
    clock = Clock()
    # One batch at Triton at a time, so "after the first batch" is well defined.
    worker, consumer, producer, backend = make({0: [(b"k%d" % i, png(i)) for i in range(12)]}, clock, in_flight=1)
    real_infer = backend.infer

    def infer_then_go_down(inputs):
        out = real_infer(inputs)
        backend.down = True  # the server dies right after answering the first batch
        return out

    backend.infer = infer_then_go_down
    assert step_until(worker, lambda: worker.status()["degraded"])
    worker.drain()
    embedded = len(rows(producer))
    assert embedded == 4
    assert consumer.committed.get(TP0) == 4, "commit stops at the first message that was not embedded"


def test_gate_backs_off_and_drops_revoked_partitions():
    clock = Clock()
    gate = OutageGate(clock, first_probe_s=0.5, max_probe_s=2.0)
    assert gate.enter("down") and not gate.enter("still down")
    assert not gate.probe_due()
    clock.now = 0.5
    assert gate.probe_due()
    gate.probe_failed()
    clock.now = 1.4
    assert not gate.probe_due()
    clock.now = 1.5
    assert gate.probe_due()

    class Item:
        def __init__(self, p):
            self.source = type("S", (), {"topic": "images", "partition": p})()

    gate.hold([Item(0), Item(1)])
    gate.hold([Item(1)])
    assert gate.drop_partitions([TopicPartition("images", 1)]) == 2
    batches, lasted = gate.release()
    assert [len(b) for b in batches] == [1] and lasted == 1.5 and not gate.active


def test_exactly_once_commits_offsets_inside_the_producer_transaction():
    settings = load_settings(
        batch={"max_size": 4, "max_wait_ms": 0},
        encoder={"max_batch_size": 8},
        commit_interval_ms=0,
        worker_id="w",
        kafka={"delivery": "exactly_once", "group_id": "g-eos"},
    )
    consumer = FakeConsumer({0: [(b"k%d" % i, png(i)) for i in range(9)] + [(b"bad", b"nope")]})
    producer = FakeProducer()
    worker = Worker(settings, ImageModality(SPEC, settings), FakeBackend(SPEC), consumer, producer)
    run_until_consumed(worker, consumer)
    assert consumer.commit_calls == [], "offsets travel only inside transactions"
    committed = [t for t in producer.transactions if t["offsets"]]
    assert committed and committed[-1]["offsets"] == {TP0: 10}
    assert all(t["group"] == "g-eos" for t in committed)
    assert sum(t["sends"] for t in producer.transactions) == len(producer.sent["embeddings.image"]) + 1
