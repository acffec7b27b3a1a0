"""The worker loop: consume -> decode -> micro-batch -> infer -> publish Arrow / dead letters -> commit.

The loop consumes, decodes and batches; ``dispatch`` runs inference, ``sinks.kafka`` publishes rows
and dead letters and turns the broker's acks into finished offsets, ``delivery`` commits those
(at-least-once or exactly-once). An input offset is committed only after its embedding row or
its dead letter was acknowledged by the broker, per partition, in offset order.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from kafka import KafkaConsumer, KafkaProducer
from kafka.structs import TopicPartition

from embedstream import metrics
from embedstream.batcher import MicroBatcher
from embedstream.config import Settings
from embedstream.delivery import delivery_for
from embedstream.dispatch import Dispatcher, Inferred
from embedstream.drift import DriftMonitor
from embedstream.encoders import EncoderSpec
from embedstream.health import BackendWatch
from embedstream.inference import InferenceBackend
from embedstream.intake import sort_decoded, source_message, wrong_model
from embedstream.modalities import Modality
from embedstream.offsets import OffsetTracker
from embedstream.rebalance import RebalanceListener
from embedstream.records import BadRecord, SourceMessage
from embedstream.sinks.kafka import KafkaSink

log = logging.getLogger(__name__)


@dataclass
class WorkerStats:
    consumed: int = 0
    embedded: int = 0
    dead_lettered: int = 0
    batches: int = 0
    output_messages: int = 0
    commits: int = 0
    outages: int = 0
    dead_letter_reasons: dict[str, int] = field(default_factory=lambda: defaultdict(int))


class Worker:
    def __init__(
        self,
        settings: Settings,
        modality: Modality,
        backend: InferenceBackend,
        consumer: KafkaConsumer,
        producer: KafkaProducer,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.stats = WorkerStats()
        self.assigned: list[TopicPartition] | None = None  # None until the group assigned us
        self._modality = modality
        self._backend = backend
        self._consumer = consumer
        self._producer = producer
        self._clock = clock
        batch = settings.batch
        self._batcher: MicroBatcher[Any] = MicroBatcher(batch.max_size, batch.max_wait_ms / 1000, clock)
        self._tracker = OffsetTracker()
        self._sink = KafkaSink(settings, modality, backend.spec, producer, self._tracker)
        # Where the served model carries an anomaly detector: its drift gauges (drift.py).
        self._drift = DriftMonitor.for_worker(backend.spec, settings)
        self._dispatcher = Dispatcher(
            backend, modality, batch.max_in_flight, clock, self._pause_for_outage, self._resume_after_outage
        )
        self._delivery = delivery_for(settings.kafka, consumer, producer, self._sink)
        self._early_dispatch = batch.dispatch_when_free
        self._commit_interval_s = settings.commit_interval_ms / 1000
        self._last_commit = clock()
        self._consumed = metrics.CONSUMED.labels(modality.name)
        # Says degraded as soon as the backend stops answering; started by run(), not by step-driven tests.
        t = settings.triton
        self._watch = BackendWatch(backend.ready, t.health_probe_interval_s, t.health_probe_timeout_s, clock)

    @property
    def spec(self) -> EncoderSpec:
        """The served encoder's spec, as read from the served model."""
        return self._backend.spec

    @property
    def modality(self) -> Modality:
        return self._modality

    @property
    def in_flight_batches(self) -> int:
        """Batches at the inference backend now."""
        return self._dispatcher.in_flight_batches

    @property
    def queued(self) -> int:
        """Decoded items waiting in the open micro-batch."""
        return len(self._batcher)

    # -- main loop ----------------------------------------------------------------------------------

    def run(self, stop: threading.Event) -> WorkerStats:
        k = self.settings.kafka
        self._delivery.begin()
        self._warm_up()
        self._watch.start()
        self._consumer.subscribe([k.input_topic], listener=RebalanceListener(self, self._consumer))
        log.info("worker %s consuming %s as group %s", self.settings.worker_id, k.input_topic, k.group_id)
        try:
            while not stop.is_set():
                self.step()
            self.drain()
        finally:
            self._watch.stop()
            self._consumer.close(autocommit=False)
        return self.stats

    def _warm_up(self) -> None:
        """Pay one-off costs before joining the group, not on the first batches of a partition.

        Best effort: a failure here shows up again, and is handled, on the first batch.
        """
        try:
            self._dispatcher.warm_up()
            self._sink.warm_up()
        except Exception as exc:
            log.warning("warm-up before joining the group failed (%s); the first batch will pay for it", exc)

    def step(self) -> None:
        self._complete(self._dispatcher.probe())
        polled = self._consumer.poll(timeout_ms=self._poll_timeout_ms(), max_records=self._batcher.room)
        if polled:
            self._accept([source_message(rec) for records in polled.values() for rec in records])
        while self._batcher.due() or (self._early_dispatch and len(self._batcher) and self._dispatcher.slot_free):
            self._submit(self._batcher.take())
        if self._clock() - self._last_commit >= self._commit_interval_s:
            self._commit()  # publishes what inference finished and collects acks first
        else:
            self._settle(block=False)

    def drain(self) -> None:
        """Finish what was consumed, wait for the broker's acks, commit: nothing half-done is left.

        During a backend outage the held messages cannot be finished: they stay uncommitted, and
        whoever owns their partitions next re-reads them.
        """
        while len(self._batcher):
            self._submit(self._batcher.take())
        self._settle(block=True)
        if self._dispatcher.degraded:
            log.warning(
                "leaving %d messages unembedded (backend down); they will be re-read", self._dispatcher.held_messages
            )
        self._commit()

    def _poll_timeout_ms(self) -> int:
        if self._dispatcher.in_flight_batches:
            timeout_s = 0.005  # come back soon to publish what the inference threads finish
        elif len(self._batcher):
            timeout_s = self._batcher.wait_left()
        else:
            timeout_s = 0.2
        return max(1, int(timeout_s * 1000))

    # -- steps --------------------------------------------------------------------------------------

    def _accept(self, msgs: list[SourceMessage]) -> None:
        """Track, decode (all of one poll at once, so a modality can batch or parallelise it) and route."""
        self.stats.consumed += len(msgs)
        self._consumed.inc(len(msgs))
        to_decode: list[SourceMessage] = []
        for msg in msgs:
            self._tracker.track(TopicPartition(msg.topic, msg.partition), msg.offset)
            pinned_elsewhere = wrong_model(msg, self._backend.spec)
            if pinned_elsewhere is not None:
                self._dead_letter(pinned_elsewhere)
            else:
                to_decode.append(msg)
        items, bad = sort_decoded(self._modality.decode_many(to_decode) if to_decode else ())
        for record in bad:
            self._dead_letter(record)
        for item in items:
            self._batcher.add(item)

    def _submit(self, batch: Sequence[Any]) -> None:
        self._complete(self._dispatcher.submit(batch))

    def _settle(self, block: bool) -> None:
        """Publish what inference finished (in submission order), then collect the broker's acks."""
        self._complete(self._dispatcher.reap(block))
        self._sink.collect_acks(block)

    def _complete(self, results: list[Inferred]) -> None:
        for result in results:
            for part, outputs in result.ok:
                self.stats.output_messages += self._sink.publish(part, outputs)
                if self._drift is not None:
                    self._drift.observe(outputs)
                self.stats.batches += 1
                self.stats.embedded += len(part)
            for item, why in result.rejected:
                bad = BadRecord(item.source, "inference_rejected", why, "BackendError")
                self._dead_letter(bad, self._modality.covers(item))
            for bad in result.unprepared:
                self._dead_letter(bad)

    def _dead_letter(self, bad: BadRecord, covers: list[tuple[TopicPartition, int]] | None = None) -> None:
        self._sink.dead_letter(bad, covers)
        self.stats.dead_lettered += 1
        self.stats.dead_letter_reasons[bad.reason] += 1

    def _commit(self) -> None:
        self._update_gauges()
        if self._delivery.commit(self._settle):
            self.stats.commits += 1
        self._last_commit = self._clock()

    def _update_gauges(self) -> None:
        metrics.IN_FLIGHT.labels(self._modality.name).set(self._tracker.in_flight())
        metrics.observe_lag(self._consumer, self.assigned or [])

    def _pause_for_outage(self) -> None:
        self.stats.outages += 1
        self._consumer.pause(*self._consumer.assignment())  # still in the group, still heartbeating

    def _resume_after_outage(self) -> None:
        self._consumer.resume(*self._consumer.paused())

    # -- lifecycle ----------------------------------------------------------------------------------

    def close(self) -> None:
        self._watch.stop()
        self._dispatcher.close()
        self._producer.close(timeout=10)
        self._backend.close()

    def status(self) -> dict[str, Any]:
        unanswered = self._watch.failing
        degraded = self._dispatcher.degraded or unanswered is not None
        return {
            "worker_id": self.settings.worker_id,
            "ready": self.assigned is not None and not degraded,
            "degraded": degraded,
            "degraded_reason": self._dispatcher.degraded_reason or unanswered or "",
            "outages": self.stats.outages,
            "assigned": sorted(f"{tp.topic}/{tp.partition}" for tp in self.assigned or []),
            "consumed": self.stats.consumed,
            "embedded": self.stats.embedded,
            "batches": self.stats.batches,
            "dead_lettered": self.stats.dead_lettered,
            "in_flight": self._tracker.in_flight(),
        }

    def on_revoked(self, partitions: list[TopicPartition]) -> None:
        self.drain()
        dropped = self._dispatcher.drop_held(partitions)
        if dropped:
            log.warning("dropped %d held messages of revoked partitions; their new owner re-reads them", dropped)
        self._modality.forget(list(partitions))  # e.g. open windows: the new owner rebuilds them from the log
        self._tracker.forget(list(partitions))

    def on_assigned(self, partitions: list[TopicPartition]) -> None:
        self.assigned = list(partitions)
        if self._dispatcher.degraded and partitions:
            self._consumer.pause(*partitions)  # still no backend: take the partitions, do not read them yet
