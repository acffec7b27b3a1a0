"""How finished input offsets are committed: at-least-once or exactly-once (``kafka.delivery``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from kafka.structs import OffsetAndMetadata, TopicPartition

from embedstream.config import KafkaSettings
from embedstream.consume.member import Member, Sender, transaction_group
from embedstream.consume.offsets import OffsetTracker
from embedstream.consume.outbox import Outbox

Settle = Callable[[bool], None]
"""Publish what the stage finished, then collect the broker's acks; ``True``: wait for all of them."""


class Delivery(Protocol):
    """Commits the offsets the outbox finished. A commit runs, in order:

    1. publish what the stage finished,
    2. flush the producer and wait for acks (acknowledged outputs finish their input offsets),
    3. commit offsets (consumer commit | send_offsets_to_transaction + commit_transaction, then
       begin the next).

    The caller passes steps 1-2 in as ``settle``; at-least-once does not wait in them (what is not
    acknowledged yet goes with a later commit, and the loop waits for everything when it drains),
    exactly-once does, so a transaction never holds half a batch.
    """

    def begin(self) -> None:
        """Before the first message is consumed."""

    def commit(self, settle: Settle) -> bool:
        """Steps 1-3; True when something was committed."""


def _offsets(committable: dict[TopicPartition, int]) -> dict[TopicPartition, OffsetAndMetadata]:
    return {tp: OffsetAndMetadata(off, "", -1) for tp, off in committable.items()}


class AtLeastOnce:
    """Consumer commits after the outputs were acknowledged: a crash in between re-reads, never loses."""

    def __init__(self, consumer: Member, tracker: OffsetTracker) -> None:
        self._consumer = consumer
        self._tracker = tracker

    def begin(self) -> None:
        return None

    def commit(self, settle: Settle) -> bool:
        settle(False)
        offsets = self._tracker.committable()
        if not offsets:
            return False
        self._consumer.commit(_offsets(offsets))
        self._tracker.mark_committed(offsets)
        return True


class ExactlyOnce:
    """Every output sent since the last commit, and the offsets they finish, in one producer transaction.

    Work held during an outage stays out of it: its offsets are not finished.
    """

    def __init__(self, producer: Sender, outbox: Outbox, group: Callable[[], Any]) -> None:
        self._producer = producer
        self._outbox = outbox
        self._group = group  # what the transaction names the group by (``member.transaction_group``)
        self._acked_at_commit = 0

    def begin(self) -> None:
        # Fences an earlier producer with this transactional id and aborts its open transaction.
        self._producer.init_transactions()
        self._producer.begin_transaction()

    def commit(self, settle: Settle) -> bool:
        settle(True)
        offsets = self._outbox.tracker.committable()
        if not offsets and self._outbox.acked == self._acked_at_commit:
            return False
        if offsets:
            self._producer.send_offsets_to_transaction(_offsets(offsets), self._group())
        self._producer.commit_transaction()
        self._outbox.tracker.mark_committed(offsets)
        self._acked_at_commit = self._outbox.acked
        self._producer.begin_transaction()
        return True


def delivery_for(kafka: KafkaSettings, consumer: Member, producer: Sender, outbox: Outbox) -> Delivery:
    if kafka.delivery == "exactly_once":
        return ExactlyOnce(producer, outbox, transaction_group(consumer, kafka.group_id))
    return AtLeastOnce(consumer, outbox.tracker)
