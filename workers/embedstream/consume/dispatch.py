"""Processing off the loop's thread: at most ``max_in_flight`` batches at the stage, results in order.

The stage's RPC or store write releases the GIL, so decoding the next batch overlaps processing of
this one. A batch that fails because the stage is away (Triton down, a store failing) is held (see
``outage``) until a probe finds the stage back.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from kafka.structs import TopicPartition

from embedstream.consume.outage import OutageGate
from embedstream.consume.stage import Processed, Stage
from embedstream.errors import BackendError, SourceUnavailable, StoreUnavailable
from embedstream.metrics import LoopMetrics

log = logging.getLogger(__name__)


class Dispatcher:
    """Runs batches on processing threads and hands them back, finished, in submission order.

    Handing them back in order keeps each partition's rows in offset order on the output topic.
    ``on_down`` runs when an outage starts and ``on_up`` when the stage answers again: the caller
    stops and restarts its consumption there.
    """

    def __init__(
        self,
        stage: Stage,
        max_in_flight: int,
        clock: Callable[[], float],
        on_down: Callable[[], None],
        on_up: Callable[[], None],
        loop_metrics: LoopMetrics | None = None,
        probe_s: tuple[float, float] = (0.5, 5.0),
        thread_name: str = "process",
    ) -> None:
        self._stage = stage
        self._max_in_flight = max_in_flight
        self._on_down = on_down
        self._on_up = on_up
        self._metrics = loop_metrics
        self._executor = ThreadPoolExecutor(max_in_flight, thread_name_prefix=thread_name)
        self._inflight: deque[tuple[list[Any], Future[Processed]]] = deque()
        self._outage = OutageGate(clock, *probe_s)
        self.outages = 0

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
        """Every processing thread opens its connection now; raises what a connection raised.

        The barrier makes each thread take one of the tasks, so no thread is left to connect on
        the first batch of a partition.
        """
        threads = self._max_in_flight
        barrier = threading.Barrier(threads)

        def connect() -> None:
            try:
                self._stage.connect()
            except BaseException:
                barrier.abort()  # the other threads stop waiting for this one
                raise
            barrier.wait(timeout=30)

        for future in [self._executor.submit(connect) for _ in range(threads)]:
            future.result()

    def submit(self, items: Sequence[Any]) -> list[Processed]:
        """Hand a batch to the processing threads; returns the batches that finished to make room for it."""
        if self._outage.active:
            self._outage.hold(list(items))
            return []
        finished: list[Processed] = []
        while len(self._inflight) >= self._max_in_flight:
            finished += self._finish(*self._inflight.popleft())
        batch = list(items)
        self._inflight.append((batch, self._executor.submit(self._stage.process, batch)))
        return finished

    def reap(self, block: bool) -> list[Processed]:
        """The finished batches at the head of the queue (all of them when ``block``), oldest first."""
        finished: list[Processed] = []
        while self._inflight and (block or self._inflight[0][1].done()):
            finished += self._finish(*self._inflight.popleft())
        return finished

    def probe(self) -> list[Processed]:
        """During an outage, when a probe is due: ask the stage, and resubmit the held batches if it is back."""
        if not self._outage.probe_due():
            return []
        if not self._stage.ready():
            self._outage.probe_failed()
            return []
        batches, lasted = self._outage.release()
        if self._metrics is not None:
            self._metrics.degraded.set(0)
        log.warning("%s is back after %.1fs: resuming %d held batches", self._stage.name, lasted, len(batches))
        self._on_up()
        return [result for batch in batches for result in self.submit(batch)]

    def drop_held(self, partitions: Iterable[TopicPartition]) -> int:
        """Forget held items of partitions this loop lost; returns how many were dropped."""
        return self._outage.drop_partitions(partitions)

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)

    def _finish(self, batch: list[Any], future: Future[Processed]) -> list[Processed]:
        try:
            result = future.result()
        except BackendError as exc:
            if not exc.retriable:  # a stage handles refusals itself; one that escapes is a bug
                raise
            self._enter_outage(str(exc), batch)
            return []
        except (StoreUnavailable, SourceUnavailable) as exc:
            self._enter_outage(str(exc), batch)
            return []
        self._outage.succeeded()
        return [result]

    def hold_intake(self, reason: str) -> None:
        """An outage that began before any batch: messages a service they need could not decode (the loop
        re-reads them); paused and probed like any other."""
        self._enter_outage(reason, None)

    def _enter_outage(self, reason: str, batch: list[Any] | None) -> None:
        was_active = self._outage.active
        if self._outage.enter(reason):
            self.outages += 1
            if self._metrics is not None:
                self._metrics.outages.inc()
            log.warning("%s unavailable (%s): pausing consumption until it is back", self._stage.name, reason)
        if not was_active:
            if self._metrics is not None:
                self._metrics.degraded.set(1)
            self._on_down()
        if batch is not None:
            self._outage.hold(batch)
