"""The worker loop: consume -> decode -> micro-batch -> infer -> publish Arrow / dead letters -> commit.

Delivery is at-least-once: an input offset is committed only after its embedding row or its
dead letter was acknowledged by the broker (``acks=all``), per partition, in offset order.
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
from kafka.consumer.subscription_state import ConsumerRebalanceListener
from kafka.producer.future import FutureRecordMetadata
from kafka.structs import OffsetAndMetadata, TopicPartition

from embedstream.batcher import MicroBatcher
from embedstream.config import Settings
from embedstream.errors import BackendError, DeliveryError
from embedstream.inference import InferenceBackend
from embedstream.modality import Modality
from embedstream.offsets import OffsetTracker
from embedstream.records import BadRecord, SourceMessage
from embedstream.sinks.arrow_codec import CONTENT_TYPE, SCHEMA_VERSION, encode_batch, output_schema
from embedstream.sinks.deadletter import dead_letter_headers

log = logging.getLogger(__name__)

_PendingSend = tuple[FutureRecordMetadata, list[tuple[TopicPartition, int]]]


@dataclass
class WorkerStats:
    consumed: int = 0
    embedded: int = 0
    dead_lettered: int = 0
    batches: int = 0
    output_messages: int = 0
    commits: int = 0
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
        self._modality = modality
        self._backend = backend
        self._consumer = consumer
        self._producer = producer
        self._clock = clock
        spec = backend.spec
        self._schema = output_schema(modality.name, spec.name, spec.version, spec.embedding_dim)
        self._out_headers = [
            ("content-type", CONTENT_TYPE.encode()),
            ("embedstream.schema_version", SCHEMA_VERSION.encode()),
            ("embedstream.model", f"{spec.name}:{spec.version}".encode()),
        ]
        self._batcher: MicroBatcher[Any] = MicroBatcher(
            settings.batch.max_size, settings.batch.max_wait_ms / 1000, clock
        )
        self._tracker = OffsetTracker()
        self._pending: list[_PendingSend] = []
        self._last_commit = clock()
        self.assigned: list[TopicPartition] | None = None  # None until the group assigned us

    # -- main loop ----------------------------------------------------------------------------------

    def run(self, stop: threading.Event) -> WorkerStats:
        k = self.settings.kafka
        self._consumer.subscribe([k.input_topic], listener=_Rebalance(self))
        log.info("worker %s consuming %s as group %s", self.settings.worker_id, k.input_topic, k.group_id)
        try:
            while not stop.is_set():
                self.step()
            self._drain()
        finally:
            self._consumer.close(autocommit=False)
        return self.stats

    def step(self) -> None:
        timeout_s = self._batcher.wait_left() if len(self._batcher) else 0.2
        polled = self._consumer.poll(timeout_ms=max(1, int(timeout_s * 1000)), max_records=self._batcher.room)
        for records in polled.values():
            for rec in records:
                self._accept(_source(rec))
        while self._batcher.due():
            self._process(self._batcher.take())
        self._collect_acks(block=False)
        if self._clock() - self._last_commit >= self.settings.commit_interval_ms / 1000:
            self._commit()

    def _drain(self) -> None:
        """Finish what was consumed, wait for the broker's acks, commit: nothing half-done is left."""
        while len(self._batcher):
            self._process(self._batcher.take())
        self._collect_acks(block=True)
        self._commit()

    # -- steps --------------------------------------------------------------------------------------

    def _accept(self, msg: SourceMessage) -> None:
        self.stats.consumed += 1
        self._tracker.track(TopicPartition(msg.topic, msg.partition), msg.offset)
        item = self._modality.decode(msg)
        if isinstance(item, BadRecord):
            self._dead_letter(item)
        else:
            self._batcher.add(item)

    def _process(self, items: Sequence[Any]) -> None:
        try:
            embeddings = self._backend.infer(self._modality.stack(items))
        except BackendError as exc:
            if exc.retriable:
                raise
            self._split_poison(items, exc)
            return
        self.stats.batches += 1
        by_partition: dict[tuple[str, int], list[int]] = defaultdict(list)
        for i, it in enumerate(items):
            by_partition[(it.source.topic, it.source.partition)].append(i)
        for (topic, partition), idx in by_partition.items():
            rows = [self._modality.row(items[i]) for i in idx]
            value = encode_batch(self._schema, rows, embeddings[idx])
            fut = self._producer.send(
                self.settings.kafka.output_topic,
                value=value,
                key=f"{topic}/{partition}".encode(),
                headers=[*self._out_headers, ("embedstream.rows", str(len(rows)).encode())],
            )
            self._pending.append((fut, [(TopicPartition(topic, partition), r.offset) for r in rows]))
            self.stats.output_messages += 1
            self.stats.embedded += len(rows)

    def _split_poison(self, items: Sequence[Any], exc: BackendError) -> None:
        """Triton refused the batch: halve it until the record it refuses is alone, then dead-letter that."""
        if len(items) == 1:
            bad = BadRecord(items[0].source, "inference_rejected", str(exc), "BackendError")
            self._dead_letter(bad)
            return
        mid = len(items) // 2
        self._process(items[:mid])
        self._process(items[mid:])

    def _dead_letter(self, bad: BadRecord) -> None:
        src = bad.source
        log.info("dead letter %s: %s (%s)", src.coordinates, bad.reason, bad.message[:200])
        fut = self._producer.send(
            self.settings.kafka.dead_letter_topic,
            value=src.value,
            key=src.key,
            headers=dead_letter_headers(bad, self.settings.worker_id),
        )
        self._pending.append((fut, [(TopicPartition(src.topic, src.partition), src.offset)]))
        self.stats.dead_lettered += 1
        self.stats.dead_letter_reasons[bad.reason] += 1

    def _collect_acks(self, block: bool) -> None:
        if block and self._pending:
            self._producer.flush(timeout=self.settings.kafka.session_timeout_ms / 1000 * 10)
        still: list[_PendingSend] = []
        for fut, offsets in self._pending:
            if not fut.is_done:
                still.append((fut, offsets))
                continue
            if fut.failed():
                raise DeliveryError(f"broker did not acknowledge an output message: {fut.exception}")
            for tp, off in offsets:
                self._tracker.done(tp, off)
        self._pending = still

    def _commit(self) -> None:
        offsets = self._tracker.committable()
        self._last_commit = self._clock()
        if not offsets:
            return
        self._consumer.commit({tp: OffsetAndMetadata(off, "", -1) for tp, off in offsets.items()})
        self._tracker.mark_committed(offsets)
        self.stats.commits += 1

    def close(self) -> None:
        self._producer.close(timeout=10)
        self._backend.close()

    def status(self) -> dict[str, Any]:
        assigned = self.assigned
        return {
            "worker_id": self.settings.worker_id,
            "ready": assigned is not None,
            "assigned": sorted(f"{tp.topic}/{tp.partition}" for tp in assigned or []),
            "consumed": self.stats.consumed,
            "embedded": self.stats.embedded,
            "dead_lettered": self.stats.dead_lettered,
            "in_flight": self._tracker.in_flight(),
        }

    def on_revoked(self, partitions: list[TopicPartition]) -> None:
        self._drain()
        self._tracker.forget(list(partitions))


class _Rebalance(ConsumerRebalanceListener):
    def __init__(self, worker: Worker) -> None:
        self._worker = worker

    def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        log.info("partitions revoked: %s", sorted(revoked))
        self._worker.on_revoked(revoked)

    def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        log.info("partitions assigned: %s", sorted(assigned))
        self._worker.assigned = list(assigned)


def _source(rec: Any) -> SourceMessage:
    return SourceMessage(
        topic=rec.topic,
        partition=rec.partition,
        offset=rec.offset,
        key=rec.key,
        value=rec.value or b"",
        timestamp_ms=rec.timestamp if rec.timestamp and rec.timestamp > 0 else int(time.time() * 1000),
        headers=tuple((k, v or b"") for k, v in (rec.headers or [])),
    )
