"""The embedding worker: the consume loop (consume.loop) with inference and Arrow publishing plugged in.

``EmbedStage`` is what the worker adds to the loop: the modality decodes, a batch is prepared
(the text tokenizer runs here, off the loop's thread) and inferred on the backend, a batch the
backend refuses for good is halved until the refused record is alone, and the rows go out as Arrow
messages through ``sinks.kafka.KafkaSink``, whose broker acks finish the input offsets.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from kafka.structs import TopicPartition

from embedstream import metrics
from embedstream.config import Settings
from embedstream.consume.loop import ConsumeLoop, LoopConfig, LoopStats
from embedstream.consume.member import Member, Sender
from embedstream.consume.offsets import OffsetTracker
from embedstream.consume.outbox import Covers, Outbox
from embedstream.consume.stage import Processed
from embedstream.drift import DriftMonitor
from embedstream.encoders import EncoderSpec
from embedstream.errors import BackendError
from embedstream.formats import sources_ready, with_input_format
from embedstream.health import BackendWatch
from embedstream.inference import InferenceBackend
from embedstream.modalities import Modality
from embedstream.records import BadRecord, SourceMessage
from embedstream.sinks.kafka import KafkaSink

log = logging.getLogger(__name__)

MODEL_HEADER = "embedstream.model"

WorkerStats = LoopStats


def wrong_model(msg: SourceMessage, spec: EncoderSpec) -> BadRecord | None:
    """A producer may pin the encoder with a ``embedstream.model`` header ("name" or "name:version")."""
    wanted = msg.header(MODEL_HEADER)
    if wanted is None:
        return None
    name, _, version = wanted.decode("utf-8", "replace").partition(":")
    if name == spec.name and version in ("", spec.version):
        return None
    served = f"{spec.name}:{spec.version}"
    return BadRecord(msg, "unknown_model", f"message asks for model {wanted!r}; this worker serves {served}")


class EmbedStage:
    """Decode with the modality, infer on the backend, publish Arrow rows."""

    def __init__(
        self, modality: Modality, backend: InferenceBackend, sink: KafkaSink, drift: DriftMonitor | None = None
    ) -> None:
        self.name = modality.name
        self._modality = modality
        self._backend = backend
        self._sink = sink  # the loop's outbox too: its acks finish the offsets the rows cover
        self._drift = drift
        self._inference_seconds = metrics.INFERENCE_SECONDS.labels(modality.name, backend.spec.name)

    def decode_many(self, msgs: Sequence[SourceMessage]) -> Sequence[Any]:
        pinned: list[Any] = []
        to_decode: list[SourceMessage] = []
        for msg in msgs:
            elsewhere = wrong_model(msg, self._backend.spec)
            if elsewhere is None:
                to_decode.append(msg)
            else:
                pinned.append(elsewhere)
        return [*pinned, *self._modality.decode_many(to_decode)] if to_decode else pinned

    def batch_weight(self, item: Any) -> int:
        return 1

    def connect(self) -> None:
        self._backend.connect()

    def ready(self) -> bool:
        # The outage probe: a modality that reads from services of its own (a schema registry, an object
        # store) is ready once they answer too.
        return self._backend.ready() and sources_ready(self._modality)

    def process(self, batch: list[Any]) -> Processed:
        """A batch the backend refuses for good is halved until the refused record is alone."""
        out = Processed()
        ready = []
        for item in self._modality.prepare(batch):
            if isinstance(item, BadRecord):
                out.unprepared.append(item)
            else:
                ready.append(item)
        parts = [ready] if ready else []
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

    def publish(self, outbox: Outbox, part: list[Any], outputs: dict[str, np.ndarray]) -> int:
        sent = self._sink.publish(part, outputs)
        if self._drift is not None:
            self._drift.observe(outputs)
        return sent

    def rejected(self, item: Any, why: str) -> BadRecord:
        return BadRecord(item.source, "inference_rejected", why, "BackendError")

    def covers(self, item: Any) -> Covers:
        return self._modality.covers(item)

    def forget(self, partitions: Sequence[TopicPartition]) -> None:
        self._modality.forget(partitions)

    def close(self) -> None:
        self._backend.close()


class Worker:
    def __init__(
        self,
        settings: Settings,
        modality: Modality,
        backend: InferenceBackend,
        consumer: Member,
        producer: Sender,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        modality = with_input_format(modality, settings)  # registry records, forced envelopes (formats/)
        self._modality = modality
        self._backend = backend
        self._sink = KafkaSink(settings, modality, backend.spec, producer, OffsetTracker())
        # Where the served model carries an anomaly detector: its drift gauges (drift.py).
        stage = EmbedStage(modality, backend, self._sink, DriftMonitor.for_worker(backend.spec, settings))
        batch = settings.batch
        config = LoopConfig(
            topics=(settings.kafka.input_topic,),
            max_size=batch.max_size,
            max_wait_s=batch.max_wait_ms / 1000,
            max_in_flight=batch.max_in_flight,
            dispatch_when_free=batch.dispatch_when_free,
            commit_interval_s=settings.commit_interval_ms / 1000,
            thread_name="infer",
        )
        self.loop = ConsumeLoop(
            stage, config, settings.kafka, consumer, producer, self._sink,
            metrics.LoopMetrics.for_worker(modality.name, backend.spec.name), clock,
        )  # fmt: skip
        # Says degraded as soon as the backend stops answering; started by run(), not by step-driven tests.
        t = settings.triton
        self._watch = BackendWatch(backend.ready, t.health_probe_interval_s, t.health_probe_timeout_s, clock)

    @property
    def stats(self) -> WorkerStats:
        return self.loop.stats

    @property
    def assigned(self) -> list[TopicPartition] | None:
        return self.loop.assigned

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
        return self.loop.in_flight_batches

    @property
    def queued(self) -> int:
        """Decoded items waiting in the open micro-batch."""
        return self.loop.queued

    def run(self, stop: threading.Event) -> WorkerStats:
        self._watch.start()
        try:
            return self.loop.run(stop, warm_up=self._sink.warm_up, step=lambda: self.step())
        finally:
            self._watch.stop()

    def step(self) -> None:
        self.loop.step()

    def drain(self) -> None:
        self.loop.drain()

    def close(self) -> None:
        self._watch.stop()
        self.loop.close()

    def status(self) -> dict[str, Any]:
        return {
            "worker_id": self.settings.worker_id,
            **self.loop.status(self._watch.failing),
            "embedded": self.stats.processed,
            "batches": self.stats.batches,
        }

    def on_revoked(self, partitions: list[TopicPartition]) -> None:
        self.loop.on_revoked(partitions)

    def on_assigned(self, partitions: list[TopicPartition]) -> None:
        self.loop.on_assigned(partitions)
