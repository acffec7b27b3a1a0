"""The worker loop: consume -> decode -> micro-batch -> infer -> publish Arrow / dead letters -> commit.

Delivery is at-least-once: an input offset is committed only after its embedding row or its
dead letter was acknowledged by the broker (``acks=all``), per partition, in offset order.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict, deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from kafka import KafkaConsumer, KafkaProducer
from kafka.consumer.subscription_state import ConsumerRebalanceListener
from kafka.producer.future import FutureRecordMetadata
from kafka.structs import OffsetAndMetadata, TopicPartition

from embedstream import metrics
from embedstream.batcher import MicroBatcher
from embedstream.config import Settings
from embedstream.errors import BackendError, DeliveryError
from embedstream.inference import InferenceBackend
from embedstream.modalities import Modality
from embedstream.offsets import OffsetTracker
from embedstream.outage import OutageGate
from embedstream.records import BadRecord, Deferred, SourceMessage
from embedstream.sinks.arrow_codec import CONTENT_TYPE, SCHEMA_VERSION, BatchEncoder, model_field, output_schema
from embedstream.sinks.deadletter import VALUE_DROPPED, dead_letter_headers

log = logging.getLogger(__name__)

_DLQ_HEADROOM = 64 * 1024  # room for headers and record framing
MODEL_HEADER = "embedstream.model"
_PendingSend = tuple[FutureRecordMetadata, list[tuple[TopicPartition, int]]]


@dataclass
class _Inferred:
    ok: list[tuple[list[Any], dict[str, np.ndarray]]] = field(default_factory=list)
    rejected: list[tuple[Any, str]] = field(default_factory=list)


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
        self._modality = modality
        self._backend = backend
        self._consumer = consumer
        self._producer = producer
        self._clock = clock
        spec = backend.spec
        self._model_columns = {o.name: o.column for o in spec.outputs[1:] if o.column}
        self._schema = output_schema(
            modality.name,
            spec.name,
            spec.version,
            spec.embedding_dim,
            [model_field(o.column, o.dtype) for o in spec.outputs[1:] if o.column],
        )
        self._encoder = BatchEncoder(self._schema)
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
        # Inference runs on threads (the RPC releases the GIL) so decoding the next batch overlaps it.
        self._executor = ThreadPoolExecutor(settings.batch.max_in_flight, thread_name_prefix="infer")
        self._inflight: deque[tuple[list[Any], Future[_Inferred]]] = deque()
        self._outage = OutageGate(clock)
        self._batch_size = metrics.BATCH_SIZE.labels(modality.name)
        self._inference_seconds = metrics.INFERENCE_SECONDS.labels(modality.name, spec.name)
        self._end_to_end = metrics.END_TO_END_SECONDS.labels(modality.name)
        self._embedded = metrics.EMBEDDED.labels(modality.name, spec.name)
        self._consumed = metrics.CONSUMED.labels(modality.name)
        self._early_dispatch = settings.batch.dispatch_when_free
        self._transactional = settings.kafka.delivery == "exactly_once"
        self._sent_in_transaction = False

    # -- main loop ----------------------------------------------------------------------------------

    def run(self, stop: threading.Event) -> WorkerStats:
        k = self.settings.kafka
        if self._transactional:
            # Fences an earlier producer with this transactional id and aborts its open transaction.
            self._producer.init_transactions()
            self._producer.begin_transaction()
        self._warm_up()
        self._consumer.subscribe([k.input_topic], listener=_Rebalance(self))
        log.info("worker %s consuming %s as group %s", self.settings.worker_id, k.input_topic, k.group_id)
        try:
            while not stop.is_set():
                self.step()
            self._drain()
        finally:
            self._consumer.close(autocommit=False)
        return self.stats

    def _warm_up(self) -> None:
        """Pay one-off costs before joining the group, not on the first batches of a partition.

        Every inference thread opens its connection (the barrier makes each thread take one task),
        and an empty batch goes through the Arrow encoder (pyarrow loads its compute module on the
        first cast). Best effort: a failure here shows up again, and is handled, on the first batch.
        """
        threads = self.settings.batch.max_in_flight
        barrier = threading.Barrier(threads)

        def connect() -> None:
            try:
                self._backend.connect()
            except BaseException:
                barrier.abort()  # the other threads stop waiting for this one
                raise
            barrier.wait(timeout=30)

        try:
            for future in [self._executor.submit(connect) for _ in range(threads)]:
                future.result()
            empty = {c: np.zeros(0, self._schema.field(c).type.to_pandas_dtype()) for c in self._model_columns.values()}
            self._encoder.encode([], np.zeros((0, self._backend.spec.embedding_dim), np.float32), empty)
        except Exception as exc:
            log.warning("warm-up before joining the group failed (%s); the first batch will pay for it", exc)

    def step(self) -> None:
        if self._outage.probe_due():
            self._probe_backend()
        if self._inflight:
            timeout_s = 0.005  # come back soon to publish what the inference threads finish
        elif len(self._batcher):
            timeout_s = self._batcher.wait_left()
        else:
            timeout_s = 0.2
        polled = self._consumer.poll(timeout_ms=max(1, int(timeout_s * 1000)), max_records=self._batcher.room)
        if polled:
            self._accept([_source(rec) for records in polled.values() for rec in records])
        while self._batcher.due() or (self._early_dispatch and len(self._batcher) and self._slot_free()):
            self._submit(self._batcher.take())
        self._reap(block=False)
        self._collect_acks(block=False)
        if self._clock() - self._last_commit >= self.settings.commit_interval_ms / 1000:
            self._commit()

    def _slot_free(self) -> bool:
        return len(self._inflight) < self.settings.batch.max_in_flight and not self._outage.active

    def _drain(self) -> None:
        """Finish what was consumed, wait for the broker's acks, commit: nothing half-done is left.

        During a backend outage the held messages cannot be finished: they stay uncommitted, and
        whoever owns their partitions next re-reads them.
        """
        while len(self._batcher):
            self._submit(self._batcher.take())
        self._reap(block=True)
        if self._outage.active:
            log.warning(
                "leaving %d messages unembedded (backend down); they will be re-read", self._outage.held_messages
            )
        self._collect_acks(block=True)
        self._commit()

    # -- steps --------------------------------------------------------------------------------------

    def _accept(self, msgs: list[SourceMessage]) -> None:
        """Track, decode (all of one poll at once, so a modality can batch or parallelise it) and route."""
        self.stats.consumed += len(msgs)
        self._consumed.inc(len(msgs))
        to_decode: list[SourceMessage] = []
        for msg in msgs:
            self._tracker.track(TopicPartition(msg.topic, msg.partition), msg.offset)
            wrong_model = self._wrong_model(msg)
            if wrong_model is not None:
                self._dead_letter(wrong_model)
            else:
                to_decode.append(msg)
        for item in self._modality.decode_many(to_decode) if to_decode else ():
            if isinstance(item, Deferred):
                for bad in item.dead_letters:
                    self._dead_letter(bad)
                if item.item is None:
                    continue  # absorbed: finished later, by the row or dead letter that covers it
                item = item.item
            if isinstance(item, BadRecord):
                self._dead_letter(item)
            else:
                self._batcher.add(item)

    def _update_gauges(self) -> None:
        metrics.IN_FLIGHT.labels(self._modality.name).set(self._tracker.in_flight())
        for tp in self.assigned or []:
            high = self._consumer.highwater(tp)
            if high is not None:
                metrics.CONSUMER_LAG.labels(tp.topic, str(tp.partition)).set(max(0, high - self._consumer.position(tp)))

    def _wrong_model(self, msg: SourceMessage) -> BadRecord | None:
        """A producer may pin the encoder with a ``embedstream.model`` header ("name" or "name:version")."""
        wanted = msg.header(MODEL_HEADER)
        if wanted is None:
            return None
        spec = self._backend.spec
        name, _, version = wanted.decode("utf-8", "replace").partition(":")
        if name == spec.name and version in ("", spec.version):
            return None
        served = f"{spec.name}:{spec.version}"
        return BadRecord(msg, "unknown_model", f"message asks for model {wanted!r}; this worker serves {served}")

    def _submit(self, items: Sequence[Any]) -> None:
        """Hand a batch to the inference threads; at most ``max_in_flight`` wait there at once."""
        if self._outage.active:
            self._outage.hold(list(items))
            return
        while len(self._inflight) >= self.settings.batch.max_in_flight:
            self._finish(*self._inflight.popleft())
        batch = list(items)
        self._inflight.append((batch, self._executor.submit(self._infer_splitting, batch)))

    def _reap(self, block: bool) -> None:
        """Publish finished batches in submission order, so rows of a partition leave in offset order."""
        while self._inflight and (block or self._inflight[0][1].done()):
            self._finish(*self._inflight.popleft())

    def _finish(self, batch: list[Any], future: Future[_Inferred]) -> None:
        try:
            result = future.result()
        except BackendError as exc:  # only retriable ones get here, after the backend's own retries
            self._enter_outage(str(exc), batch)
            return
        self._complete(result)

    def _enter_outage(self, reason: str, batch: list[Any]) -> None:
        if self._outage.enter(reason):
            self.stats.outages += 1
            metrics.OUTAGES.labels(self._backend.spec.name).inc()
            metrics.DEGRADED.labels(self._backend.spec.name).set(1)
            log.warning("inference backend unavailable (%s): pausing consumption until it is back", reason)
            self._consumer.pause(*self._consumer.assignment())
        self._outage.hold(batch)

    def _probe_backend(self) -> None:
        if not self._backend.ready():
            self._outage.probe_failed()
            return
        batches, lasted = self._outage.release()
        metrics.DEGRADED.labels(self._backend.spec.name).set(0)
        log.warning("inference backend is back after %.1fs: resuming %d held batches", lasted, len(batches))
        self._consumer.resume(*self._consumer.paused())
        for batch in batches:
            self._submit(batch)

    def _infer_splitting(self, items: list[Any]) -> _Inferred:
        """Runs on an inference thread. A batch Triton refuses is halved until the refused record is alone."""
        out = _Inferred()
        parts = [items]
        while parts:
            part = parts.pop()
            try:
                started = time.perf_counter()
                outputs = self._backend.infer(self._modality.stack(part))
                self._inference_seconds.observe(time.perf_counter() - started)
                out.ok.append((part, outputs))
            except BackendError as exc:
                if exc.retriable:
                    raise
                if len(part) == 1:
                    out.rejected.append((part[0], str(exc)))
                else:
                    mid = len(part) // 2
                    parts += [part[mid:], part[:mid]]
        return out

    def _complete(self, result: _Inferred) -> None:
        for part, outputs in result.ok:
            self._publish(part, outputs)
        for item, why in result.rejected:
            self._dead_letter(
                BadRecord(item.source, "inference_rejected", why, "BackendError"), self._modality.covers(item)
            )

    def _publish(self, items: Sequence[Any], outputs: dict[str, np.ndarray]) -> None:
        embeddings = outputs[self._backend.spec.embedding_output.name]
        self.stats.batches += 1
        self._batch_size.observe(len(items))
        now_ms = time.time() * 1000
        for it in items:
            # Event time as the row carries it (envelope time, or the broker timestamp).
            self._end_to_end.observe(max(0.0, now_ms - self._modality.event_time_ms(it)) / 1000)
        by_partition: dict[tuple[str, int], list[int]] = defaultdict(list)
        for i, it in enumerate(items):
            by_partition[(it.source.topic, it.source.partition)].append(i)
        # One message per partition keeps each partition's rows in offset order on the output topic;
        # the columns are built once, grouped by partition, and each message is a slice of them.
        order = [i for idx in by_partition.values() for i in idx]
        if len(by_partition) > 1:
            embeddings = embeddings[order]
        ordered = [items[i] for i in order]
        rows = [self._modality.row(it) for it in ordered]
        extra = {column: outputs[name][order] for name, column in self._model_columns.items()}
        slices: list[tuple[int, int]] = []
        start = 0
        for idx in by_partition.values():
            slices.append((start, len(idx)))
            start += len(idx)
        values = self._encoder.encode_slices(rows, embeddings, extra, slices)
        for (topic, partition), value, (start, n) in zip(by_partition, values, slices, strict=True):
            fut = self._producer.send(
                self.settings.kafka.output_topic,
                value=value,
                key=f"{topic}/{partition}".encode(),
                headers=[*self._out_headers, ("embedstream.rows", str(n).encode())],
            )
            self._pending.append((fut, [c for it in ordered[start : start + n] for c in self._modality.covers(it)]))
            self.stats.output_messages += 1
            self.stats.embedded += n
            self._embedded.inc(n)

    def _dead_letter(self, bad: BadRecord, covers: list[tuple[TopicPartition, int]] | None = None) -> None:
        """``covers``: the offsets this dead letter finishes, when the record stood for more than its message."""
        src = bad.source
        log.info("dead letter %s: %s (%s)", src.coordinates, bad.reason, bad.message[:200])
        headers = dead_letter_headers(bad, self.settings.worker_id)
        value = src.value
        if len(value) + _DLQ_HEADROOM > self.settings.kafka.producer_max_request_bytes:
            # Too big to re-publish whole: keep the coordinates so it can be fetched from the source topic.
            headers.append((VALUE_DROPPED, str(len(value)).encode()))
            value = b""
        fut = self._producer.send(self.settings.kafka.dead_letter_topic, value=value, key=src.key, headers=headers)
        self._pending.append((fut, covers or [(TopicPartition(src.topic, src.partition), src.offset)]))
        self.stats.dead_lettered += 1
        self.stats.dead_letter_reasons[bad.reason] += 1
        metrics.DEAD_LETTERS.labels(self._modality.name, bad.reason).inc()

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
            self._sent_in_transaction = True
        self._pending = still

    def _commit(self) -> None:
        self._update_gauges()
        if self._transactional:
            self._commit_transaction()
            return
        offsets = self._tracker.committable()
        self._last_commit = self._clock()
        if not offsets:
            return
        self._consumer.commit({tp: OffsetAndMetadata(off, "", -1) for tp, off in offsets.items()})
        self._tracker.mark_committed(offsets)
        self.stats.commits += 1

    def _commit_transaction(self) -> None:
        """Exactly-once: every output sent since the last commit, and the offsets they finish, in one transaction.

        Batches still at Triton are waited for first, so the transaction never holds half a batch;
        work held during an outage stays out of it (its offsets are not finished).
        """
        self._reap(block=True)
        self._collect_acks(block=True)
        offsets = self._tracker.committable()
        self._last_commit = self._clock()
        if not offsets and not self._sent_in_transaction:
            return
        if offsets:
            self._producer.send_offsets_to_transaction(
                {tp: OffsetAndMetadata(off, "", -1) for tp, off in offsets.items()}, self.settings.kafka.group_id
            )
        self._producer.commit_transaction()
        self._tracker.mark_committed(offsets)
        self.stats.commits += 1
        self._sent_in_transaction = False
        self._producer.begin_transaction()

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)
        self._producer.close(timeout=10)
        self._backend.close()

    def status(self) -> dict[str, Any]:
        assigned = self.assigned
        return {
            "worker_id": self.settings.worker_id,
            "ready": assigned is not None and not self._outage.active,
            "degraded": self._outage.active,
            "degraded_reason": self._outage.reason,
            "outages": self.stats.outages,
            "assigned": sorted(f"{tp.topic}/{tp.partition}" for tp in assigned or []),
            "consumed": self.stats.consumed,
            "embedded": self.stats.embedded,
            "batches": self.stats.batches,
            "dead_lettered": self.stats.dead_lettered,
            "in_flight": self._tracker.in_flight(),
        }

    def on_revoked(self, partitions: list[TopicPartition]) -> None:
        self._drain()
        dropped = self._outage.drop_partitions(partitions)
        if dropped:
            log.warning("dropped %d held messages of revoked partitions; their new owner re-reads them", dropped)
        self._modality.forget(list(partitions))  # e.g. open windows: the new owner rebuilds them from the log
        self._tracker.forget(list(partitions))

    def on_assigned(self, partitions: list[TopicPartition]) -> None:
        self.assigned = list(partitions)
        if self._outage.active and partitions:
            self._consumer.pause(*partitions)  # still no backend: take the partitions, do not read them yet


class _Rebalance(ConsumerRebalanceListener):
    def __init__(self, worker: Worker) -> None:
        self._worker = worker

    def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        log.info("partitions revoked: %s", sorted(revoked))
        self._worker.on_revoked(revoked)

    def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        log.info("partitions assigned: %s", sorted(assigned))
        self._worker.on_assigned(list(assigned))


def _source(rec: Any) -> SourceMessage:
    return SourceMessage(
        topic=rec.topic,
        partition=rec.partition,
        offset=rec.offset,
        key=rec.key,
        value=rec.value or b"",
        timestamp_ms=rec.timestamp if rec.timestamp and rec.timestamp > 0 else int(time.time() * 1000),
        headers=tuple((k, v or b"") for k, v in rec.headers) if rec.headers else (),
    )
