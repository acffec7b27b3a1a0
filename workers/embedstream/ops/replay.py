"""``embedstream replay``: copy a range of an input topic, records as they were, into a replay topic.

Why a copy and not a consumer-group offset reset: the live group keeps its position, and the range
is embedded by whatever group reads the replay topic (e.g. workers running a new model version,
writing to a new output topic), so old and new embeddings never mix on one topic by accident.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from kafka import KafkaConsumer
from kafka.consumer.fetcher import ConsumerRecord

from embedstream.kafka_io import partitions_of
from embedstream.ops.kafka import AckedSender
from embedstream.topic_reader import Span, clamp_spans, offsets_at, read_spans, watermarks

# Provenance of a replayed record: "<topic>/<partition>/<offset>" of the original.
REPLAY_SOURCE = "embedstream.replay.source"


@dataclass(frozen=True)
class ReplayRange:
    topic: str
    partitions: tuple[int, ...] | None = None  # None: every partition
    start_offset: int | None = None
    end_offset: int | None = None  # exclusive
    start_time_ms: int | None = None
    end_time_ms: int | None = None  # exclusive


def plan(consumer: KafkaConsumer, r: ReplayRange) -> list[Span]:
    """Resolve times to offsets; the end defaults to the end of the log *now*, so a replay is bounded even
    while producers keep writing (see read_spans)."""
    available = partitions_of(consumer, r.topic)
    parts = list(r.partitions) if r.partitions is not None else available
    missing = sorted(set(parts) - set(available))
    if missing:
        raise ValueError(f"topic {r.topic!r} has no partition(s) {missing} (it has {available})")
    low, high = watermarks(consumer, r.topic, parts)
    start: dict[int, int | None] = dict.fromkeys(parts, r.start_offset)
    end: dict[int, int | None] = dict.fromkeys(parts, r.end_offset)
    if r.end_time_ms is not None:
        # Nothing at or after the end time: read to the end of the log (None).
        end = offsets_at(consumer, r.topic, parts, r.end_time_ms)
    if r.start_time_ms is not None:
        found = offsets_at(consumer, r.topic, parts, r.start_time_ms)
        # Nothing at or after the start time: an empty span (end = start).
        start = {p: (low[p] if o is None else o) for p, o in found.items()}
        end = {p: (low[p] if o is None else end[p]) for p, o in found.items()}
    return clamp_spans(parts, low, high, start, end)


def replay_message(rec: ConsumerRecord, to_topic: str, target_partitions: set[int]) -> dict[str, object]:
    """The record as it was: key, value, headers and timestamp (envelope-less inputs take their event time
    from it), in the same partition number where the target has it so per-partition order is kept."""
    headers = [(k, v) for k, v in rec.headers or [] if k != REPLAY_SOURCE]
    headers.append((REPLAY_SOURCE, f"{rec.topic}/{rec.partition}/{rec.offset}".encode()))
    return {
        "topic": to_topic,
        "key": rec.key,
        "value": rec.value,
        "headers": headers,
        "partition": rec.partition if rec.partition in target_partitions else None,
        "timestamp_ms": rec.timestamp if rec.timestamp is not None and rec.timestamp >= 0 else None,
    }


def replay(
    consumer: KafkaConsumer,
    sender: AckedSender,
    spans: list[Span],
    from_topic: str,
    to_topic: str,
    target_partitions: set[int],
    on_progress: Callable[[int], None] = lambda n: None,
    start_time_ms: int | None = None,
    end_time_ms: int | None = None,
) -> int:
    """Copy every record of the spans; returns how many were acknowledged by the broker.

    With times, records are also checked one by one: the spans come from the broker's time index, which
    some brokers answer loosely (the embedded Tansu broker returns the log's start for any time).
    """
    for rec in read_spans(consumer, from_topic, spans):
        if (start_time_ms is not None and rec.timestamp < start_time_ms) or (
            end_time_ms is not None and rec.timestamp >= end_time_ms
        ):
            continue
        on_progress(sender.send(**replay_message(rec, to_topic, target_partitions)))
    on_progress(sender.drain())
    return sender.acked
