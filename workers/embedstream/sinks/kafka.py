"""The Kafka sink: rows as Arrow messages, dead letters, and the broker's acks as finished offsets.

An input offset is finished only once the broker acknowledged (``acks=all``) the row or dead letter
that carries it, so the commit point never passes an output that could still be lost.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import numpy as np
from kafka import KafkaProducer
from kafka.producer.future import FutureRecordMetadata
from kafka.structs import TopicPartition

from embedstream import metrics
from embedstream.config import Settings
from embedstream.encoders import EncoderSpec
from embedstream.errors import DeliveryError
from embedstream.lineage import served
from embedstream.modalities import Modality
from embedstream.offsets import OffsetTracker
from embedstream.records import BadRecord
from embedstream.sinks.arrow_codec import CONTENT_TYPE, SCHEMA_VERSION, BatchEncoder, model_field, output_schema
from embedstream.sinks.deadletter import VALUE_DROPPED, dead_letter_headers

log = logging.getLogger(__name__)

_DLQ_HEADROOM = 64 * 1024  # room for headers and record framing
_PendingSend = tuple[FutureRecordMetadata, list[tuple[TopicPartition, int]]]


class KafkaSink:
    """Publishes a modality's rows to the output topic and its bad records to the dead-letter topic."""

    def __init__(
        self,
        settings: Settings,
        modality: Modality,
        spec: EncoderSpec,
        producer: KafkaProducer,
        tracker: OffsetTracker,
    ) -> None:
        self.tracker = tracker
        self.acked = 0  # sends the broker acknowledged, ever
        self._kafka = settings.kafka
        self._worker_id = settings.worker_id
        self._modality = modality
        self._producer = producer
        self._embedding = spec.embedding_output.name
        self._dim = spec.embedding_dim
        self._model_columns = {o.name: o.column for o in spec.outputs[1:] if o.column}
        self.schema = output_schema(
            modality.name,
            spec.name,
            spec.version,
            spec.embedding_dim,
            [model_field(o.column, o.dtype) for o in spec.outputs[1:] if o.column],
            weights_sha256=served(spec.weights_sha256),
            preprocessing_sha256=served(spec.preprocessing_sha256),
        )
        self._encoder = BatchEncoder(self.schema)
        # Built once: every message carries the same lineage, so a send only appends its row count.
        self._headers = [
            ("content-type", CONTENT_TYPE.encode()),
            ("embedstream.schema_version", SCHEMA_VERSION.encode()),
            ("embedstream.model", f"{spec.name}:{spec.version}".encode()),
            ("embedstream.weights_sha256", served(spec.weights_sha256).encode()),
            ("embedstream.preprocessing_sha256", served(spec.preprocessing_sha256).encode()),
        ]
        self._pending: list[_PendingSend] = []
        self._batch_size = metrics.BATCH_SIZE.labels(modality.name)
        self._end_to_end = metrics.END_TO_END_SECONDS.labels(modality.name)
        self._embedded = metrics.EMBEDDED.labels(modality.name, spec.name)

    @property
    def pending(self) -> int:
        """Sends not yet acknowledged by the broker."""
        return len(self._pending)

    def warm_up(self) -> None:
        """An empty batch through the encoder: pyarrow loads its compute module on the first cast."""
        empty = {c: np.zeros(0, self.schema.field(c).type.to_pandas_dtype()) for c in self._model_columns.values()}
        self._encoder.encode([], np.zeros((0, self._dim), np.float32), empty)

    def publish(self, items: Sequence[Any], outputs: dict[str, np.ndarray]) -> int:
        """One message per partition of the batch; returns how many messages were sent."""
        self._observe(items)
        by_partition: dict[tuple[str, int], list[int]] = defaultdict(list)
        for i, it in enumerate(items):
            by_partition[(it.source.topic, it.source.partition)].append(i)
        # One message per partition keeps each partition's rows in offset order on the output topic;
        # the columns are built once, grouped by partition, and each message is a slice of them.
        order = [i for idx in by_partition.values() for i in idx]
        embeddings = outputs[self._embedding]
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
                self._kafka.output_topic,
                value=value,
                key=f"{topic}/{partition}".encode(),
                headers=[*self._headers, ("embedstream.rows", str(n).encode())],
            )
            self._pending.append((fut, [c for it in ordered[start : start + n] for c in self._modality.covers(it)]))
            self._embedded.inc(n)
        return len(slices)

    def dead_letter(self, bad: BadRecord, covers: list[tuple[TopicPartition, int]] | None = None) -> None:
        """``covers``: the offsets this dead letter finishes, when the record stood for more than its message."""
        src = bad.source
        log.info("dead letter %s: %s (%s)", src.coordinates, bad.reason, bad.message[:200])
        headers = dead_letter_headers(bad, self._worker_id)
        value = src.value
        if len(value) + _DLQ_HEADROOM > self._kafka.producer_max_request_bytes:
            # Too big to re-publish whole: keep the coordinates so it can be fetched from the source topic.
            headers.append((VALUE_DROPPED, str(len(value)).encode()))
            value = b""
        fut = self._producer.send(self._kafka.dead_letter_topic, value=value, key=src.key, headers=headers)
        self._pending.append((fut, covers or [(TopicPartition(src.topic, src.partition), src.offset)]))
        metrics.DEAD_LETTERS.labels(self._modality.name, bad.reason).inc()

    def collect_acks(self, block: bool) -> None:
        """Finish the offsets of acknowledged sends (after flushing the producer when ``block``).

        Raises DeliveryError when the broker refused a send: its offsets must never be committed.
        """
        if block and self._pending:
            self._producer.flush(timeout=self._kafka.session_timeout_ms / 1000 * 10)
        still: list[_PendingSend] = []
        for fut, offsets in self._pending:
            if not fut.is_done:
                still.append((fut, offsets))
                continue
            if fut.failed():
                raise DeliveryError(f"broker did not acknowledge an output message: {fut.exception}")
            for tp, off in offsets:
                self.tracker.done(tp, off)
            self.acked += 1
        self._pending = still

    def _observe(self, items: Sequence[Any]) -> None:
        self._batch_size.observe(len(items))
        now_ms = time.time() * 1000
        for it in items:
            # Event time as the row carries it (envelope time, or the broker timestamp).
            self._end_to_end.observe(max(0.0, now_ms - self._modality.event_time_ms(it)) / 1000)
