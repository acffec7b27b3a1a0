"""Inference off the loop's thread: at most ``max_in_flight`` batches at the backend, results in order.

The RPC releases the GIL, so decoding the next batch overlaps inference of this one; so does what
a modality leaves to ``prepare`` (the text tokenizer), which runs here too. A batch the
backend refuses for good is halved until the refused record is alone; a batch that fails because
the backend is away is held (see ``outage``) until a probe finds the backend back.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from kafka.structs import TopicPartition

from embedstream import metrics
from embedstream.errors import BackendError
from embedstream.inference import InferenceBackend
from embedstream.modalities import Modality
from embedstream.outage import OutageGate
from embedstream.records import BadRecord

log = logging.getLogger(__name__)


@dataclass
class Inferred:
    """One batch back from the backend: the parts it embedded with their outputs, the items it refused,
    and the items the modality could not prepare for it."""

    ok: list[tuple[list[Any], dict[str, np.ndarray]]] = field(default_factory=list)
    rejected: list[tuple[Any, str]] = field(default_factory=list)
    unprepared: list[BadRecord] = field(default_factory=list)


class Dispatcher:
    """Runs batches on inference threads and hands them back, finished, in submission order.

    Handing them back in order keeps each partition's rows in offset order on the output topic.
    ``on_down`` runs when an outage starts and ``on_up`` when the backend answers again: the
    caller stops and restarts its consumption there.
    """

    def __init__(
        self,
        backend: InferenceBackend,
        modality: Modality,
        max_in_flight: int,
        clock: Callable[[], float],
        on_down: Callable[[], None],
        on_up: Callable[[], None],
    ) -> None:
        self._backend = backend
        self._modality = modality
        self._max_in_flight = max_in_flight
        self._on_down = on_down
        self._on_up = on_up
        self._executor = ThreadPoolExecutor(max_in_flight, thread_name_prefix="infer")
        self._inflight: deque[tuple[list[Any], Future[Inferred]]] = deque()
        self._outage = OutageGate(clock)
        self._inference_seconds = metrics.INFERENCE_SECONDS.labels(modality.name, backend.spec.name)

    @property
    def in_flight_batches(self) -> int:
        return len(self._inflight)

    @property
    def slot_free(self) -> bool:
        return len(self._inflight) < self._max_in_flight and not self._outage.active

    @property
    def degraded(self) -> bool:
        return self._outage.active

    @property
    def degraded_reason(self) -> str:
        return self._outage.reason

    @property
    def held_messages(self) -> int:
        return self._outage.held_messages

    def warm_up(self) -> None:
        """Every inference thread opens its backend connection now; raises what a connection raised.

        The barrier makes each thread take one of the tasks, so no thread is left to connect on
        the first batch of a partition.
        """
        threads = self._max_in_flight
        barrier = threading.Barrier(threads)

        def connect() -> None:
            try:
                self._backend.connect()
            except BaseException:
                barrier.abort()  # the other threads stop waiting for this one
                raise
            barrier.wait(timeout=30)

        for future in [self._executor.submit(connect) for _ in range(threads)]:
            future.result()

    def submit(self, items: Sequence[Any]) -> list[Inferred]:
        """Hand a batch to the inference threads; returns the batches that finished to make room for it."""
        if self._outage.active:
            self._outage.hold(list(items))
            return []
        finished: list[Inferred] = []
        while len(self._inflight) >= self._max_in_flight:
            finished += self._finish(*self._inflight.popleft())
        batch = list(items)
        self._inflight.append((batch, self._executor.submit(self._infer_splitting, batch)))
        return finished

    def reap(self, block: bool) -> list[Inferred]:
        """The finished batches at the head of the queue (all of them when ``block``), oldest first."""
        finished: list[Inferred] = []
        while self._inflight and (block or self._inflight[0][1].done()):
            finished += self._finish(*self._inflight.popleft())
        return finished

    def probe(self) -> list[Inferred]:
        """During an outage, when a probe is due: ask the backend, and resubmit the held batches if it is back."""
        if not self._outage.probe_due():
            return []
        if not self._backend.ready():
            self._outage.probe_failed()
            return []
        batches, lasted = self._outage.release()
        metrics.DEGRADED.labels(self._backend.spec.name).set(0)
        log.warning("inference backend is back after %.1fs: resuming %d held batches", lasted, len(batches))
        self._on_up()
        return [result for batch in batches for result in self.submit(batch)]

    def drop_held(self, partitions: Iterable[TopicPartition]) -> int:
        """Forget held items of partitions this worker lost; returns how many were dropped."""
        return self._outage.drop_partitions(partitions)

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)

    def _finish(self, batch: list[Any], future: Future[Inferred]) -> list[Inferred]:
        try:
            return [future.result()]
        except BackendError as exc:  # only retriable ones get here, after the backend's own retries
            self._enter_outage(str(exc), batch)
            return []

    def _enter_outage(self, reason: str, batch: list[Any]) -> None:
        if self._outage.enter(reason):
            metrics.OUTAGES.labels(self._backend.spec.name).inc()
            metrics.DEGRADED.labels(self._backend.spec.name).set(1)
            log.warning("inference backend unavailable (%s): pausing consumption until it is back", reason)
            self._on_down()
        self._outage.hold(batch)

    def _infer_splitting(self, items: list[Any]) -> Inferred:
        """Runs on an inference thread. A batch the backend refuses is halved until the refused record is alone."""
        out = Inferred()
        ready = []
        for item in self._modality.prepare(items):
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
