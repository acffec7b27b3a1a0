"""The consume-and-commit loop: poll -> intake -> micro-batch -> stage -> outputs / dead letters -> commit.

One loop serves the embedding worker and every store sink; each plugs its ``Stage`` in
(consume.stage). The loop consumes, decodes through the stage and batches; ``dispatch`` runs the
stage's processing off this thread and holds batches through outages; the stage publishes what a
batch made through the ``Outbox``, whose acks (or a store's acknowledgement) finish input
offsets; ``delivery`` commits those (at-least-once or exactly-once). An input offset is committed
only after its output or its dead letter was acknowledged, per partition, in offset order.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from kafka.structs import TopicPartition

from embedstream import metrics
from embedstream.config import KafkaSettings
from embedstream.consume.batcher import MicroBatcher
from embedstream.consume.delivery import delivery_for
from embedstream.consume.dispatch import Dispatcher
from embedstream.consume.intake import sort_decoded
from embedstream.consume.member import Member, Sender, join, poller
from embedstream.consume.outbox import Covers, Outbox
from embedstream.consume.stage import Processed, Stage
from embedstream.metrics import LoopMetrics
from embedstream.records import BadRecord, SourceMessage, Unavailable

log = logging.getLogger("embedstream.worker")


@dataclass(frozen=True)
class LoopConfig:
    topics: tuple[str, ...]
    max_size: int  # of a batch, in the stage's batch_weight
    max_wait_s: float
    max_in_flight: int = 2
    # While fewer than max_in_flight batches are out, send what has arrived instead of waiting out max_wait_s.
    dispatch_when_free: bool = True
    commit_interval_s: float = 1.0
    max_poll_records: int | None = None  # None: the open batch's room
    probe_s: tuple[float, float] = (0.5, 5.0)  # first and longest wait between outage probes
    thread_name: str = "process"  # of the processing threads, as thread dumps and logs show them


@dataclass
class LoopStats:
    consumed: int = 0
    processed: int = 0  # items the stage finished (rows embedded, messages stored)
    dead_lettered: int = 0
    batches: int = 0
    output_messages: int = 0
    commits: int = 0
    outages: int = 0
    dead_letter_reasons: dict[str, int] = field(default_factory=lambda: defaultdict(int))

    @property
    def embedded(self) -> int:
        return self.processed


class ConsumeLoop:
    def __init__(
        self,
        stage: Stage,
        config: LoopConfig,
        kafka: KafkaSettings,
        consumer: Member,
        producer: Sender,
        outbox: Outbox,
        loop_metrics: LoopMetrics,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.stats = LoopStats()
        self.assigned: list[TopicPartition] | None = None  # None until the group assigned us
        self.stage = stage
        self.outbox = outbox
        self._config = config
        self._kafka = kafka
        self._consumer = consumer
        self._poll = poller(consumer)
        self._producer = producer
        self._metrics = loop_metrics
        self._clock = clock
        self._batcher: MicroBatcher[Any] = MicroBatcher(config.max_size, config.max_wait_s, clock, stage.batch_weight)
        self._tracker = outbox.tracker
        self._dispatcher = Dispatcher(
            stage, config.max_in_flight, clock, self._pause_for_outage, self._resume_after_outage,
            loop_metrics, config.probe_s, config.thread_name,
        )  # fmt: skip
        self._delivery = delivery_for(kafka, consumer, producer, outbox)
        self._last_commit = clock()

    @property
    def in_flight_batches(self) -> int:
        """Batches at the stage now."""
        return self._dispatcher.in_flight_batches

    @property
    def queued(self) -> int:
        """Decoded items waiting in the open micro-batch."""
        return len(self._batcher)

    @property
    def degraded(self) -> bool:
        return self._dispatcher.degraded

    @property
    def degraded_reason(self) -> str:
        return self._dispatcher.degraded_reason

    @property
    def held_messages(self) -> int:
        return self._dispatcher.held_messages

    # -- main loop ----------------------------------------------------------------------------------

    def run(
        self,
        stop: threading.Event,
        warm_up: Callable[[], None] | None = None,
        step: Callable[[], None] | None = None,
    ) -> LoopStats:
        """Until ``stop``: ``step`` (this loop's own unless the owner wraps it), then drain."""
        step = step or self.step
        self._delivery.begin()
        self._warm_up(warm_up)
        topics = list(self._config.topics)
        join(self._consumer, topics, self)
        log.info("%s consuming %s as group %s", self.stage.name, ",".join(topics), self._kafka.group_id)
        try:
            while not stop.is_set():
                step()
            self.drain()
        finally:
            self._consumer.close(autocommit=False)
        return self.stats

    def _warm_up(self, more: Callable[[], None] | None) -> None:
        """Pay one-off costs before joining the group, not on the first batches of a partition.

        Best effort: a failure here shows up again, and is handled, on the first batch.
        """
        try:
            self._dispatcher.warm_up()
            if more is not None:
                more()
        except Exception as exc:
            log.warning("warm-up before joining the group failed (%s); the first batch will pay for it", exc)

    def step(self) -> None:
        self._complete(self._dispatcher.probe())
        room = self._batcher.room if self._config.max_poll_records is None else self._config.max_poll_records
        polled = self._poll(self._poll_timeout_ms(), max(1, room))
        if polled:
            self._accept(polled)
        early = self._config.dispatch_when_free
        while self._batcher.due() or (early and len(self._batcher) and self._dispatcher.slot_free):
            self._submit(self._batcher.take())
        if self._clock() - self._last_commit >= self._config.commit_interval_s:
            self._commit()  # publishes what the stage finished and collects acks first
        else:
            self._settle(block=False)

    def drain(self) -> None:
        """Finish what was consumed, wait for the acks, commit: nothing half-done is left.

        During an outage the held messages cannot be finished: they stay uncommitted, and whoever
        owns their partitions next re-reads them.
        """
        while len(self._batcher):
            self._submit(self._batcher.take())
        self._settle(block=True)
        if self._dispatcher.degraded:
            log.warning(
                "%s down: leaving %d messages unfinished; they will be re-read",
                self.stage.name,
                self._dispatcher.held_messages,
            )
        self._commit()

    def close(self) -> None:
        self._dispatcher.close()
        self._producer.close(timeout=10)
        self.stage.close()

    def status(self, failing: str | None = None) -> dict[str, Any]:
        """The loop's part of ``/readyz``; ``failing``: a reason the owner knows of (a health probe)."""
        degraded = self._dispatcher.degraded or failing is not None
        return {
            "ready": self.assigned is not None and not degraded,
            "degraded": degraded,
            "degraded_reason": self._dispatcher.degraded_reason or failing or "",
            "outages": self.stats.outages,
            "assigned": sorted(f"{tp.topic}/{tp.partition}" for tp in self.assigned or []),
            "consumed": self.stats.consumed,
            "dead_lettered": self.stats.dead_lettered,
            "in_flight": self._tracker.in_flight(),
        }

    def _poll_timeout_ms(self) -> int:
        if self._dispatcher.in_flight_batches:
            timeout_s = 0.005  # come back soon to publish what the processing threads finish
        elif self._dispatcher.degraded:
            timeout_s = 0.2
        elif len(self._batcher):
            timeout_s = self._batcher.wait_left()
        else:
            timeout_s = 0.2
        return max(1, int(timeout_s * 1000))

    # -- steps --------------------------------------------------------------------------------------

    def _accept(self, msgs: list[SourceMessage]) -> None:
        """Track, decode (all of one poll at once, so a stage can batch or parallelise it) and route."""
        self.stats.consumed += len(msgs)
        self._metrics.consumed.inc(len(msgs))
        for msg in msgs:
            self._tracker.track(TopicPartition(msg.topic, msg.partition), msg.offset)
        items, bad, again = sort_decoded(self.stage.decode_many(msgs))
        for record in bad:
            self._dead_letter(record)
        for item in items:
            self._batcher.add(item)
        if again:
            self._read_again(again)

    def _read_again(self, again: list[Unavailable]) -> None:
        """Messages the stage could not decode while a service they need is away: hold, and re-read them.

        The stage decoded nothing at or after the first of them in its partition, so seeking there
        loses nothing; their offsets stay unfinished, so no commit passes them meanwhile.
        """
        first: dict[TopicPartition, int] = {}
        for held in again:
            tp = TopicPartition(held.source.topic, held.source.partition)
            first[tp] = min(first.get(tp, held.source.offset), held.source.offset)
        for tp, offset in first.items():
            self._consumer.seek(tp, offset)
        self._dispatcher.hold_intake(again[0].reason)

    def _submit(self, batch: Sequence[Any]) -> None:
        self._complete(self._dispatcher.submit(batch))

    def _settle(self, block: bool) -> None:
        """Publish what the stage finished (in submission order), then collect the acks."""
        self._complete(self._dispatcher.reap(block))
        self.outbox.collect_acks(block)

    def _complete(self, results: list[Processed]) -> None:
        for result in results:
            for part, outputs in result.ok:
                self.stats.output_messages += self.stage.publish(self.outbox, part, outputs)
                self.stats.batches += 1
                self.stats.processed += len(part)
            for item, why in result.rejected:
                self._dead_letter(self.stage.rejected(item, why), self.stage.covers(item))
            for bad in result.unprepared:
                self._dead_letter(bad)

    def _dead_letter(self, bad: BadRecord, covers: Covers | None = None) -> None:
        self.outbox.dead_letter(bad, covers)
        self.stats.dead_lettered += 1
        self.stats.dead_letter_reasons[bad.reason] += 1

    def _commit(self) -> None:
        self._metrics.in_flight.set(self._tracker.in_flight())
        metrics.observe_lag(self._consumer, self.assigned or [])
        if self._delivery.commit(self._settle):
            self.stats.commits += 1
        self._last_commit = self._clock()

    def _pause_for_outage(self) -> None:
        self.stats.outages = self._dispatcher.outages
        self._consumer.pause(*self._consumer.assignment())  # still in the group, still heartbeating

    def _resume_after_outage(self) -> None:
        self._consumer.resume(*self._consumer.paused())

    # -- rebalance (consume.rebalance runs these off the consumer's IO thread) -----------------------

    def on_revoked(self, partitions: list[TopicPartition]) -> None:
        self.drain()
        dropped = self._dispatcher.drop_held(partitions)
        if dropped:
            log.warning("dropped %d held messages of revoked partitions; their new owner re-reads them", dropped)
        self.stage.forget(list(partitions))  # e.g. open windows: the new owner rebuilds them from the log
        self._tracker.forget(list(partitions))

    def on_assigned(self, partitions: list[TopicPartition]) -> None:
        self.assigned = list(partitions)
        if self._dispatcher.degraded and partitions:
            self._consumer.pause(*partitions)  # still unavailable: take the partitions, do not read them yet
