"""The new version's consumer group: where it starts reading, and how far behind the input topics it is."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

from kafka import KafkaConsumer
from kafka.structs import OffsetAndMetadata, TopicPartition

from embedstream.config import KafkaSettings
from embedstream.errors import ConfigError
from embedstream.kafka_io import make_admin, make_consumer, make_reader, partitions_of
from embedstream.topic_reader import offsets_at


@dataclass(frozen=True)
class PartitionLag:
    topic: str
    partition: int
    start: int  # where the group began (the rollout's 0 %)
    committed: int
    end: int

    @property
    def lag(self) -> int:
        return max(0, self.end - self.committed)

    @property
    def done(self) -> int:
        return max(0, min(self.committed, self.end) - self.start)

    @property
    def total(self) -> int:
        return max(0, self.end - self.start)


def key(topic: str, partition: int) -> str:
    return f"{topic}/{partition}"


def committed_offsets(k: KafkaSettings, group: str, topics: Sequence[str]) -> dict[str, int]:
    """The group's committed offsets on ``topics``, as ``topic/partition`` -> offset."""
    admin = make_admin(k)
    try:
        offsets = admin.list_group_offsets(group).get(group, {})
    finally:
        admin.close()
    return {key(tp.topic, tp.partition): om.offset for tp, om in offsets.items() if tp.topic in topics}


def _partitions(reader: KafkaConsumer, topics: Sequence[str]) -> list[TopicPartition]:
    return [TopicPartition(t, p) for t in topics for p in partitions_of(reader, t)]


def log_ends(reader: KafkaConsumer, tps: list[TopicPartition], timeout_s: float = 5.0) -> dict[TopicPartition, int]:
    """The offset after each partition's last record, confirmed by reading from the end the broker reports.

    Some brokers answer ListOffsets LATEST loosely (the embedded Tansu gives the last record batch's base
    offset + 1), so the reported end minus one is read and the last offset seen wins; where nothing
    comes back (a transaction marker ends the log) the reported end stands.
    """
    ends = dict(reader.end_offsets(tps))
    pending = [tp for tp in tps if ends[tp] > 0]
    if not pending:
        return ends
    reader.assign(pending)
    for tp in pending:
        reader.seek(tp, ends[tp] - 1)
    deadline, quiet = time.monotonic() + timeout_s, 0
    # Until nothing more comes for a second: a partition whose log ends in a transaction marker never answers.
    while time.monotonic() < deadline and quiet < 5:
        got = {tp: records for tp, records in reader.poll(timeout_ms=200).items() if records}
        for tp, records in got.items():
            ends[tp] = max(ends[tp], records[-1].offset + 1)
        quiet = 0 if got else quiet + 1
    return ends


def place_group(
    k: KafkaSettings,
    group: str,
    topics: Sequence[str],
    *,
    start_offset: int | None = None,
    start_time_ms: int | None = None,
) -> dict[str, int]:
    """Commit the group's starting offsets before its workers join: the start of the retained range, the
    first record at or after a time, or a given offset (clamped to the retained range), per partition.

    A committed offset wins over the workers' ``auto_offset_reset``, so the new version backfills from
    where the rollout says whatever its config's reset policy is.
    """
    reader = make_reader(k, auto_offset_reset="earliest")
    try:
        tps = _partitions(reader, topics)
        low, high = reader.beginning_offsets(tps), log_ends(reader, tps)
        start = dict(low)
        if start_offset is not None:
            start = {tp: min(max(start_offset, low[tp]), high[tp]) for tp in tps}
        elif start_time_ms is not None:
            for topic in topics:
                parts = [tp.partition for tp in tps if tp.topic == topic]
                for p, found in offsets_at(reader, topic, parts, start_time_ms).items():
                    tp = TopicPartition(topic, p)
                    start[tp] = high[tp] if found is None else found
    finally:
        reader.close()
    committer = make_consumer(k.model_copy(update={"group_id": group}), f"{k.client_id}-rollout")
    try:
        committer.assign(tps)
        committer.commit({tp: OffsetAndMetadata(o, "", -1) for tp, o in start.items()})
    finally:
        committer.close()
    return {key(tp.topic, tp.partition): o for tp, o in start.items()}


def group_lag(k: KafkaSettings, group: str, topics: Sequence[str], start: dict[str, int]) -> list[PartitionLag]:
    """Per partition of ``topics``: the group's start, committed offset and the log's end now."""
    if not topics:
        raise ConfigError(f"group {group!r} reads no topics")
    committed = committed_offsets(k, group, topics)
    reader = make_reader(k)
    try:
        tps = _partitions(reader, topics)
        low, high = reader.beginning_offsets(tps), log_ends(reader, tps)
    finally:
        reader.close()
    out = []
    for tp in tps:
        name = key(tp.topic, tp.partition)
        begin = start.get(name, low[tp])
        out.append(PartitionLag(tp.topic, tp.partition, begin, committed.get(name, begin), high[tp]))
    return out
