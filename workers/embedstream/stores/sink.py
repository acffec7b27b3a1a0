"""The sink loop: consume output messages -> decode -> gather -> store write -> dead letters -> commit.

An offset is committed only after the store acknowledged the rows of its message, or the sink's
dead-letter topic acknowledged the message the store refused. While the store is down the sink
holds what it gathered, pauses its partitions (staying in the group) and retries with backoff;
nothing past the held messages is committed, so a crash then re-reads them, and the store's upsert
keeps the re-read rows single. A message the sink cannot decode, or whose rows the store refuses,
goes to the dead-letter topic with the reason and the stream goes on.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
from kafka import KafkaConsumer, KafkaProducer
from kafka.structs import OffsetAndMetadata, TopicPartition
from prometheus_client import Counter, Gauge

from embedstream.config import KafkaSettings, Settings
from embedstream.errors import DeliveryError
from embedstream.offsets import OffsetTracker
from embedstream.rebalance import RebalanceListener
from embedstream.records import BadRecord, SourceMessage
from embedstream.sinks.arrow_codec import decode_embeddings
from embedstream.sinks.deadletter import dead_letter_headers
from embedstream.stores.base import Refusal, Store, StoreUnavailable

log = logging.getLogger(__name__)

ROWS_STORED = Counter("embedstream_sink_rows", "Rows the store acknowledged (re-written rows count again)", ["store"])
SINK_DEAD_LETTERS = Counter(
    "embedstream_sink_dead_letters", "Output messages dead-lettered by the sink", ["store", "reason"]
)
STORE_OUTAGES = Counter(
    "embedstream_sink_store_outages", "Times the sink held its partitions for a failed store", ["store"]
)
STORE_DEGRADED = Gauge("embedstream_sink_degraded", "1 while the store does not acknowledge writes", ["store"])

MAX_RECORDS_PER_POLL = 500


def sink_kafka(settings: Settings, store: str) -> KafkaSettings:
    """The worker's Kafka settings (brokers, security) with the sink's group and dead-letter topic."""
    s = settings.sink
    return settings.kafka.model_copy(
        update={
            "group_id": s.group_id or f"embedstream-sink-{store}",
            "dead_letter_topic": s.dead_letter_topic or f"deadletter.sink.{store}",
            "input_topic": ",".join(s.topics),
        }
    )


@dataclass
class SinkStats:
    consumed: int = 0  # output messages
    rows_in: int = 0
    rows_stored: int = 0
    dead_lettered: int = 0
    writes: int = 0
    commits: int = 0
    outages: int = 0


@dataclass
class _Gathered:
    msg: SourceMessage
    table: pa.Table | None
    refusal: Refusal | None


class StoreSink:
    def __init__(
        self,
        settings: Settings,
        store: Store,
        consumer: KafkaConsumer,
        producer: KafkaProducer,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.store = store
        self.stats = SinkStats()
        self.assigned: list[TopicPartition] | None = None
        self._kafka = sink_kafka(settings, store.name)
        self._consumer = consumer
        self._producer = producer
        self._clock = clock
        self._tracker = OffsetTracker()
        self._gathered: list[_Gathered] = []
        self._gathered_rows = 0
        self._first_at = 0.0
        self._batch_rows = settings.sink.batch_rows
        self._max_wait_s = settings.sink.max_wait_ms / 1000
        self._backoff_s = settings.sink.retry_backoff_s
        self._degraded_reason: str | None = None
        self._retry_at = 0.0
        # The rebalance thread drains through the same state while the loop's thread waits in poll().
        self._lock = threading.RLock()

    @property
    def degraded(self) -> bool:
        return self._degraded_reason is not None

    # -- main loop ----------------------------------------------------------------------------------

    def run(self, stop: threading.Event) -> SinkStats:
        topics = list(self.settings.sink.topics)
        self._consumer.subscribe(topics, listener=RebalanceListener(self, self._consumer))
        log.info("sink %s consuming %s as group %s", self.store.name, topics, self._kafka.group_id)
        try:
            while not stop.is_set():
                self.step()
            self.drain()
        finally:
            self._consumer.close(autocommit=False)
        return self.stats

    def step(self) -> None:
        if self.degraded and self._clock() >= self._retry_at:
            with self._lock:
                self._flush()
        timeout_s = 0.2 if self.degraded or not self._gathered else max(0.001, self._wait_left())
        polled = self._consumer.poll(timeout_ms=int(timeout_s * 1000), max_records=MAX_RECORDS_PER_POLL)
        with self._lock:
            for records in polled.values():
                for rec in records:
                    self._gather(rec)
            if (
                self._gathered
                and not self.degraded
                and (self._gathered_rows >= self._batch_rows or self._wait_left() <= 0)
            ):
                self._flush()

    def drain(self) -> None:
        """Write what was gathered and commit; during an outage, leave it uncommitted for a re-read."""
        with self._lock:
            if self._gathered:
                self._flush()
            if self.degraded:
                log.warning(
                    "store %s down: leaving %d messages uncommitted; they will be re-read",
                    self.store.name,
                    len(self._gathered),
                )
            self._commit()

    def _wait_left(self) -> float:
        return self._first_at + self._max_wait_s - self._clock()

    # -- steps --------------------------------------------------------------------------------------

    def _gather(self, rec: Any) -> None:
        msg = SourceMessage(
            rec.topic, rec.partition, rec.offset, rec.key, rec.value or b"", rec.timestamp, tuple(rec.headers or ())
        )
        self._tracker.track(TopicPartition(msg.topic, msg.partition), msg.offset)
        self.stats.consumed += 1
        table: pa.Table | None = None
        refusal: Refusal | None = None
        if not msg.value:
            refusal = Refusal("empty", "empty message value on an output topic", "ValueError")
        else:
            try:
                table = decode_embeddings(msg.value)
            except (pa.ArrowException, ValueError, OSError) as exc:
                refusal = Refusal("undecodable", f"not an embedstream Arrow message: {exc}", type(exc).__name__)
        if not self._gathered:
            self._first_at = self._clock()
        self._gathered.append(_Gathered(msg, table, refusal))
        if table is not None:
            self._gathered_rows += table.num_rows
            self.stats.rows_in += table.num_rows

    def _flush(self) -> bool:
        """Admit, write, dead-letter, then finish the offsets: all of it or, on an outage, none."""
        try:
            admitted: list[pa.Table] = []
            refused: list[tuple[SourceMessage, Refusal]] = []
            for g in self._gathered:
                verdict = g.refusal if g.table is None else self.store.admit(g.table)
                if isinstance(verdict, Refusal):
                    refused.append((g.msg, verdict))
                elif verdict is not None:
                    admitted.append(verdict)
            written = self.store.write(admitted) if admitted else 0
            self._dead_letter(refused)
        except (StoreUnavailable, DeliveryError) as exc:
            self._enter_outage(str(exc))
            return False
        for g in self._gathered:
            self._tracker.done(TopicPartition(g.msg.topic, g.msg.partition), g.msg.offset)
        self.stats.rows_stored += written
        self.stats.writes += 1
        ROWS_STORED.labels(self.store.name).inc(written)
        self._gathered.clear()
        self._gathered_rows = 0
        self._leave_outage()
        self._commit()
        return True

    def _dead_letter(self, refused: list[tuple[SourceMessage, Refusal]]) -> None:
        if not refused:
            return
        futures = []
        for msg, why in refused:
            log.info("dead letter %s: %s (%s)", msg.coordinates, why.reason, why.message[:200])
            bad = BadRecord(msg, why.reason, why.message, why.error_class)  # type: ignore[arg-type]
            headers = dead_letter_headers(bad, self.settings.worker_id)
            futures.append(
                self._producer.send(self._kafka.dead_letter_topic, value=msg.value, key=msg.key, headers=headers)
            )
        self._producer.flush(timeout=30)
        for fut in futures:
            if not fut.is_done or fut.failed():
                raise DeliveryError(f"dead-letter topic did not acknowledge: {fut.exception}")
        for _, why in refused:
            SINK_DEAD_LETTERS.labels(self.store.name, why.reason).inc()
        self.stats.dead_lettered += len(refused)

    def _commit(self) -> None:
        offsets = self._tracker.committable()
        if not offsets:
            return
        try:
            self._consumer.commit({tp: OffsetAndMetadata(off, "", -1) for tp, off in offsets.items()})
        except Exception as exc:  # e.g. a rebalance under way: the rows are stored, a re-read rewrites them
            log.warning("offset commit failed (%s); the next owner re-reads from the last commit", exc)
            return
        self._tracker.mark_committed(offsets)
        self.stats.commits += 1

    def _enter_outage(self, reason: str) -> None:
        if not self.degraded:
            self.stats.outages += 1
            STORE_OUTAGES.labels(self.store.name).inc()
            STORE_DEGRADED.labels(self.store.name).set(1)
            log.warning("store %s unavailable, holding %d messages: %s", self.store.name, len(self._gathered), reason)
            self._backoff_s = self.settings.sink.retry_backoff_s
        else:
            self._backoff_s = min(self._backoff_s * 2, self.settings.sink.max_backoff_s)
        self._degraded_reason = reason[:500]
        self._retry_at = self._clock() + self._backoff_s
        self._consumer.pause(*self._consumer.assignment())  # still in the group, still heartbeating

    def _leave_outage(self) -> None:
        if self.degraded:
            log.info("store %s acknowledged again; resuming", self.store.name)
            STORE_DEGRADED.labels(self.store.name).set(0)
            self._degraded_reason = None
            self._consumer.resume(*self._consumer.paused())

    # -- lifecycle ----------------------------------------------------------------------------------

    def close(self) -> None:
        self._producer.close(timeout=10)
        self.store.close()

    def status(self) -> dict[str, Any]:
        return {
            "sink": self.store.name,
            "worker_id": self.settings.worker_id,
            "ready": self.assigned is not None and not self.degraded,
            "degraded": self.degraded,
            "degraded_reason": self._degraded_reason,
            "outages": self.stats.outages,
            "assigned": sorted(f"{tp.topic}/{tp.partition}" for tp in self.assigned or []),
            "consumed": self.stats.consumed,
            "rows_in": self.stats.rows_in,
            "rows_stored": self.stats.rows_stored,
            "dead_lettered": self.stats.dead_lettered,
            "in_flight": self._tracker.in_flight(),
        }

    def on_revoked(self, partitions: list[TopicPartition]) -> None:
        with self._lock:
            if self._gathered and not self.degraded:
                self._flush()
            else:
                self._commit()
            gone = set(partitions)
            kept = [g for g in self._gathered if TopicPartition(g.msg.topic, g.msg.partition) not in gone]
            if len(kept) != len(self._gathered):
                log.warning(
                    "dropped %d held messages of revoked partitions; their new owner re-reads them",
                    len(self._gathered) - len(kept),
                )
                self._gathered = kept
                self._gathered_rows = sum(g.table.num_rows for g in kept if g.table is not None)
            self._tracker.forget(list(partitions))

    def on_assigned(self, partitions: list[TopicPartition]) -> None:
        self.assigned = list(partitions)
        if self.degraded and partitions:
            self._consumer.pause(*partitions)
