"""The store sink: the consume loop (consume.loop) with a store's upsert plugged in.

``StoreStage`` decodes output messages (Arrow IPC), and a batch is admitted and upserted into the
store; the store's acknowledgement finishes the messages' offsets. A message the sink cannot
decode, or whose rows the store refuses, goes to the sink's dead-letter topic with the reason and
the stream goes on. A write the store fails is an outage: the loop holds the batch, pauses its
partitions (staying in the group) and retries with backoff; nothing past the held messages is
committed, so a crash then re-reads them, and the store's upsert keeps the re-read rows single.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
from kafka.structs import TopicPartition

from embedstream import metrics
from embedstream.config import KafkaSettings, Settings
from embedstream.consume.loop import ConsumeLoop, LoopConfig
from embedstream.consume.member import Member, Sender
from embedstream.consume.offsets import OffsetTracker
from embedstream.consume.outbox import Covers, Outbox
from embedstream.consume.stage import Processed
from embedstream.records import BadRecord, SourceMessage
from embedstream.sinks.arrow_codec import decode_embeddings
from embedstream.stores.base import Refusal, Store

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


@dataclass(frozen=True)
class OutputMessage:
    """An output message the sink decoded: its source coordinates and its rows."""

    source: SourceMessage
    table: pa.Table


def _refused(msg: SourceMessage, why: Refusal) -> BadRecord:
    return BadRecord(msg, why.reason, why.message, why.error_class)  # type: ignore[arg-type]


class StoreStage:
    """Decode Arrow output messages, admit and upsert their rows, finish their offsets once stored."""

    def __init__(self, store: Store) -> None:
        self.name = store.name
        self.store = store
        self.rows_in = 0
        self.rows_stored = 0  # rows the store acknowledged (re-written rows count again)
        self.writes = 0
        self._rows_stored = metrics.ROWS_STORED.labels(store.name)

    def decode_many(self, msgs: Sequence[SourceMessage]) -> Sequence[Any]:
        return [self._decode(msg) for msg in msgs]

    def _decode(self, msg: SourceMessage) -> OutputMessage | BadRecord:
        if not msg.value:
            return _refused(msg, Refusal("empty", "empty message value on an output topic", "ValueError"))
        try:
            table = decode_embeddings(msg.value)
        except (pa.ArrowException, ValueError, OSError) as exc:
            why = Refusal("undecodable", f"not an embedstream Arrow message: {exc}", type(exc).__name__)
            return _refused(msg, why)
        self.rows_in += table.num_rows
        return OutputMessage(msg, table)

    def batch_weight(self, item: OutputMessage) -> int:
        return max(1, item.table.num_rows)

    def connect(self) -> None:
        return None

    def ready(self) -> bool:
        return True  # the probe is the retried write: a store has no cheaper honest check

    def process(self, batch: list[OutputMessage]) -> Processed:
        """Admit each message's rows, upsert the admitted ones in one write. Raises StoreUnavailable."""
        out = Processed()
        admitted: list[pa.Table] = []
        stored: list[OutputMessage] = []
        for item in batch:
            verdict = self.store.admit(item.table)
            if isinstance(verdict, Refusal):
                out.unprepared.append(_refused(item.source, verdict))
                continue
            if verdict is not None:
                admitted.append(verdict)
            stored.append(item)
        written = self.store.write(admitted) if admitted else 0
        self.rows_stored += written
        self.writes += 1
        self._rows_stored.inc(written)
        if stored:
            out.ok.append((stored, {}))
        return out

    def publish(self, outbox: Outbox, part: list[OutputMessage], outputs: dict[str, np.ndarray]) -> int:
        outbox.finish([c for item in part for c in self.covers(item)])  # the store acknowledged them
        return 0

    def rejected(self, item: OutputMessage, why: str) -> BadRecord:
        return BadRecord(item.source, "store_rejected", why, "StoreRefused")

    def covers(self, item: OutputMessage) -> Covers:
        return [(TopicPartition(item.source.topic, item.source.partition), item.source.offset)]

    def forget(self, partitions: Sequence[TopicPartition]) -> None:
        return None

    def close(self) -> None:
        self.store.close()


class StoreSink:
    """A store's sink process: its consumer group on the output topics, the loop, the stage."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        consumer: Member,
        producer: Sender,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.store = store
        s = settings.sink
        # Dead letters are plain idempotent sends, never in a transaction: the store is not in one.
        kafka = sink_kafka(settings, store.name).model_copy(update={"delivery": "at_least_once"})
        self._stage = StoreStage(store)
        dead_letters = metrics.LoopMetrics.for_sink(store.name)
        outbox = Outbox(kafka, settings.worker_id, producer, OffsetTracker(), dead_letters.dead_letters)
        config = LoopConfig(
            topics=tuple(s.topics),
            max_size=s.batch_rows,
            max_wait_s=s.max_wait_ms / 1000,
            max_in_flight=1,  # one write at a time keeps a key's upserts in offset order
            dispatch_when_free=False,  # gather up to batch_rows: a store write has a high fixed cost
            commit_interval_s=settings.commit_interval_ms / 1000,
            max_poll_records=MAX_RECORDS_PER_POLL,
            probe_s=(s.retry_backoff_s, s.max_backoff_s),
            thread_name="store-write",
        )
        self.loop = ConsumeLoop(self._stage, config, kafka, consumer, producer, outbox, dead_letters, clock)

    @property
    def assigned(self) -> list[TopicPartition] | None:
        return self.loop.assigned

    @property
    def degraded(self) -> bool:
        return self.loop.degraded

    @property
    def stats(self) -> SinkStats:
        loop, stage = self.loop.stats, self._stage
        return SinkStats(
            consumed=loop.consumed,
            rows_in=stage.rows_in,
            rows_stored=stage.rows_stored,
            dead_lettered=loop.dead_lettered,
            writes=stage.writes,
            commits=loop.commits,
            outages=loop.outages,
        )

    def run(self, stop: threading.Event) -> SinkStats:
        self.loop.run(stop)
        return self.stats

    def step(self) -> None:
        self.loop.step()

    def drain(self) -> None:
        self.loop.drain()

    def close(self) -> None:
        self.loop.close()

    def status(self) -> dict[str, Any]:
        stats = self.stats
        return {
            "sink": self.store.name,
            "worker_id": self.settings.worker_id,
            **self.loop.status(),
            "rows_in": stats.rows_in,
            "rows_stored": stats.rows_stored,
        }
