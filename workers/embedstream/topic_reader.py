"""Reading a topic outside any consumer group: every partition from the log's start (or end), or the records
between offsets, then stop. ``tail``, ``replay``, ``dlq``, the readback of the demo, the bench and tests, and
training's topic ranges all read through here (clients: ``embedstream.kafka_io``).

Torch-free and tool-free: the operations commands load it.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

from kafka import KafkaConsumer
from kafka.consumer.fetcher import ConsumerRecord
from kafka.structs import TopicPartition

from embedstream.kafka_io import partitions_of


def assign_all(consumer: KafkaConsumer, topics: Sequence[str], *, from_beginning: bool = True) -> list[TopicPartition]:
    """Every partition of ``topics``, assigned to ``consumer`` (no group) at the log's start, or its end."""
    tps = [TopicPartition(t, p) for t in topics for p in partitions_of(consumer, t)]
    consumer.assign(tps)
    if from_beginning:
        consumer.seek_to_beginning(*tps)
    else:
        consumer.seek_to_end(*tps)
    return tps


@dataclass(frozen=True)
class Span:
    """Offsets of one partition from ``start``: up to ``end`` (exclusive) when one was asked for, else to the
    end of the log as it was when reading started; ``high`` is the end the broker reported then."""

    partition: int
    start: int
    end: int | None
    high: int

    @property
    def size(self) -> int:
        """Records expected (for progress): exact on Kafka, a lower bound where the broker under-reports ``high``."""
        return max(0, (self.high if self.end is None else self.end) - self.start)

    @property
    def empty(self) -> bool:
        return self.end is not None and self.end <= self.start


def clamp_spans(
    partitions: Iterable[int],
    low: dict[int, int],
    high: dict[int, int],
    start: dict[int, int | None],
    end: dict[int, int | None],
) -> list[Span]:
    """Requested spans per partition; a start before the log's beginning (retention moved it) starts there."""
    spans = []
    for p in partitions:
        s = low[p] if start.get(p) is None else max(int(start[p]), low[p])  # type: ignore[arg-type]
        e = end.get(p)
        spans.append(Span(p, s, None if e is None else max(int(e), s), high[p]))
    return spans


def watermarks(consumer: KafkaConsumer, topic: str, partitions: list[int]) -> tuple[dict[int, int], dict[int, int]]:
    tps = [TopicPartition(topic, p) for p in partitions]
    low = consumer.beginning_offsets(tps)
    high = consumer.end_offsets(tps)
    return {tp.partition: low[tp] for tp in tps}, {tp.partition: high[tp] for tp in tps}


def offsets_at(consumer: KafkaConsumer, topic: str, partitions: list[int], when_ms: int) -> dict[int, int | None]:
    """The first offset at or after ``when_ms`` per partition; None where nothing is that recent."""
    found = consumer.offsets_for_times({TopicPartition(topic, p): when_ms for p in partitions})
    return {tp.partition: (None if hit is None else hit.offset) for tp, hit in found.items()}


class _SpanReader:
    """The spans of one ``read_spans`` still unfinished, and when each last brought records."""

    def __init__(self, consumer: KafkaConsumer, topic: str, pending: dict[int, Span]) -> None:
        self.consumer, self.topic, self.pending = consumer, topic, pending
        self.started_ms = int(time.time() * 1000)
        self.tps = {p: TopicPartition(topic, p) for p in pending}
        consumer.assign(list(self.tps.values()))
        for p, first in pending.items():
            consumer.seek(self.tps[p], first.start)
        self.last_record = dict.fromkeys(pending, time.monotonic())

    def finish(self, p: int) -> None:
        self.pending.pop(p, None)
        self.consumer.pause(self.tps[p])

    def past_end(self, span: Span, rec: ConsumerRecord) -> bool:
        beyond = span.end is None and rec.offset >= span.high and rec.timestamp > self.started_ms
        return (span.end is not None and rec.offset >= span.end) or beyond

    def poll(self) -> Iterator[ConsumerRecord]:
        for tp, records in self.consumer.poll(timeout_ms=300).items():
            span = self.pending.get(tp.partition)
            if span is None:
                continue
            self.last_record[tp.partition] = time.monotonic()
            for rec in records:
                if self.past_end(span, rec):
                    self.finish(tp.partition)
                    break
                yield rec

    def check_positions(self, idle_timeout_s: float, caught_up_idle_s: float) -> None:
        now = time.monotonic()
        for p in list(self.pending):
            span, position = self.pending[p], self.consumer.position(self.tps[p])
            # position() moves past gaps too, so a span ending on a marker still completes.
            if span.end is not None and position >= span.end:
                self.finish(p)
            elif position >= span.high and now - self.last_record[p] > caught_up_idle_s:
                self.finish(p)
            elif now - self.last_record[p] > idle_timeout_s:
                raise TimeoutError(f"no records from {self.topic}[{p}] at offset {position} for {idle_timeout_s:.0f}s")


def read_spans(
    consumer: KafkaConsumer,
    topic: str,
    spans: list[Span],
    idle_timeout_s: float = 30.0,
    caught_up_idle_s: float = 1.5,
) -> Iterator[ConsumerRecord]:
    """Every record in the spans, then stop. Offsets that are gaps (compaction, transaction markers) are skipped.

    Where no end was asked for, the end is "the log now". Kafka's reported end offset says exactly where that
    is, but some brokers under-report it (the embedded Tansu broker counts record batches), so past the
    reported end reading goes on through records written before reading started, and a partition is done at
    the first later record, or when it brought nothing for ``caught_up_idle_s`` after the reported end.
    """
    pending = {s.partition: s for s in spans if not s.empty}
    if not pending:
        return
    reader = _SpanReader(consumer, topic, pending)
    while reader.pending:
        yield from reader.poll()
        reader.check_positions(idle_timeout_s, caught_up_idle_s)


def offset_spans(
    consumer: KafkaConsumer,
    topic: str,
    start_offset: int | None = None,
    end_offset: int | None = None,
    partitions: Sequence[int] | None = None,
) -> list[Span]:
    """The same ``[start_offset, end_offset)`` on each partition (default: all of them), clamped to the log; no
    start means the log's start, no end the end of the log as it is when reading starts."""
    parts = list(partitions) if partitions else partitions_of(consumer, topic)
    low, high = watermarks(consumer, topic, parts)
    return clamp_spans(parts, low, high, dict.fromkeys(parts, start_offset), dict.fromkeys(parts, end_offset))
