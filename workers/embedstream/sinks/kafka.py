"""The Kafka sink: a modality's rows as Arrow messages on the output topic.

It is the worker's ``Outbox`` (consume.outbox): the broker's ack of a row message finishes the
input offsets its rows cover, as the ack of a dead letter does.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import numpy as np

from embedstream import metrics
from embedstream.config import Settings
from embedstream.consume.member import Sender
from embedstream.consume.offsets import OffsetTracker
from embedstream.consume.outbox import Outbox
from embedstream.encoders import EncoderSpec
from embedstream.formats import input_fields
from embedstream.lineage import served
from embedstream.modalities import Modality
from embedstream.sinks.arrow_codec import CONTENT_TYPE, SCHEMA_VERSION, BatchEncoder, model_field, output_schema


class KafkaSink(Outbox):
    """Publishes a modality's rows to the output topic; its bad records go out as the Outbox's dead letters."""

    def __init__(
        self,
        settings: Settings,
        modality: Modality,
        spec: EncoderSpec,
        producer: Sender,
        tracker: OffsetTracker,
    ) -> None:
        super().__init__(
            settings.kafka,
            settings.worker_id,
            producer,
            tracker,
            lambda reason: metrics.DEAD_LETTERS.labels(modality.name, reason),
        )
        self._modality = modality
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
            input_fields=input_fields(settings, modality.name),
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
        self._batch_size = metrics.BATCH_SIZE.labels(modality.name)
        self._end_to_end = metrics.END_TO_END_SECONDS.labels(modality.name)
        self._embedded = metrics.EMBEDDED.labels(modality.name, spec.name)

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
            self.send(
                self._kafka.output_topic,
                value,
                f"{topic}/{partition}".encode(),
                [*self._headers, ("embedstream.rows", str(n).encode())],
                [c for it in ordered[start : start + n] for c in self._modality.covers(it)],
            )
            self._embedded.inc(n)
        return len(slices)

    def _observe(self, items: Sequence[Any]) -> None:
        self._batch_size.observe(len(items))
        now_ms = time.time() * 1000
        # Event time as the row carries it (envelope time, or the broker timestamp).
        event_ms = np.fromiter((self._modality.event_time_ms(it) for it in items), np.float64, len(items))
        metrics.observe_many(self._end_to_end, np.maximum(0.0, now_ms - event_ms) / 1000)
