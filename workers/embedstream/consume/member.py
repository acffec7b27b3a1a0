"""The loop's group member on either Kafka client: kafka-python's ``KafkaConsumer``, or a member that
hands over ``SourceMessage``s itself (``kafka_librdkafka.LoopConsumer``, ``kafka.client = "librdkafka"``).

The calls both make alike (seek, pause, resume, commit, close) the loop makes directly; the three
that differ (joining the group, polling, naming the group in a transaction) go through here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, TypeAlias, runtime_checkable

from kafka import KafkaConsumer, KafkaProducer
from kafka.structs import OffsetAndMetadata, TopicPartition

from embedstream.consume.intake import source_message
from embedstream.consume.rebalance import RebalanceListener, RebalanceSteps
from embedstream.records import SourceMessage


@runtime_checkable
class PollingMember(Protocol):
    """A group member whose client runs the rebalance steps on the polling thread and reads SourceMessages."""

    def subscribe(self, topics: list[str], steps: RebalanceSteps) -> None: ...
    def poll_messages(self, timeout_ms: int, max_records: int) -> list[SourceMessage]: ...
    def group_metadata(self) -> Any: ...
    def seek(self, tp: TopicPartition, offset: int) -> None: ...
    def pause(self, *parts: TopicPartition) -> None: ...
    def resume(self, *parts: TopicPartition) -> None: ...
    def paused(self) -> set[TopicPartition]: ...
    def assignment(self) -> set[TopicPartition]: ...
    def commit(self, offsets: dict[TopicPartition, OffsetAndMetadata]) -> None: ...
    def close(self, autocommit: bool = False) -> None: ...


Member: TypeAlias = KafkaConsumer | PollingMember


class Sending(Protocol):
    """One send's outcome as the outbox reads it (kafka-python's ``FutureRecordMetadata`` is one)."""

    @property
    def is_done(self) -> bool: ...
    @property
    def exception(self) -> BaseException | None: ...
    def failed(self) -> bool: ...


class LoopSender(Protocol):
    """The producer calls the loop makes, as librdkafka's ``kafka_librdkafka.LoopProducer`` offers them."""

    def send(
        self, topic: str, value: bytes, key: bytes | None = None, headers: list[tuple[str, bytes]] | None = None
    ) -> Sending: ...
    def flush(self, timeout: float | None = None) -> None: ...
    def close(self, timeout: float | None = None) -> None: ...
    def init_transactions(self) -> None: ...
    def begin_transaction(self) -> None: ...
    def send_offsets_to_transaction(self, offsets: dict[TopicPartition, OffsetAndMetadata], group: Any) -> None: ...
    def commit_transaction(self) -> None: ...


Sender: TypeAlias = KafkaProducer | LoopSender
Poll = Callable[[int, int], list[SourceMessage]]


def join(consumer: Member, topics: list[str], steps: RebalanceSteps) -> None:
    """Subscribe, with ``steps`` run on every rebalance."""
    if isinstance(consumer, PollingMember):
        consumer.subscribe(topics, steps)
    else:
        consumer.subscribe(topics, listener=RebalanceListener(steps, consumer))


def poller(consumer: Member) -> Poll:
    """``poll(timeout_ms, max_records)`` -> the messages, in partition order."""
    if isinstance(consumer, PollingMember):
        return consumer.poll_messages

    def poll(timeout_ms: int, max_records: int) -> list[SourceMessage]:
        polled = consumer.poll(timeout_ms=timeout_ms, max_records=max_records)
        return [source_message(rec) for records in polled.values() for rec in records] if polled else []

    return poll


def transaction_group(consumer: Member, group_id: str) -> Callable[[], Any]:
    """What ``send_offsets_to_transaction`` names the group by: kafka-python takes its id, librdkafka
    the member's current group metadata (generation included, so a fenced member's commit fails)."""
    if isinstance(consumer, PollingMember):
        return consumer.group_metadata
    return lambda: group_id
