"""Sends whose broker acks finish input offsets: output rows and dead letters alike.

An input offset is finished only once the broker acknowledged (``acks=all``) the message that
carries it, so the commit point never passes an output that could still be lost. Work that needs
no send (rows a store acknowledged) finishes its offsets directly.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from typing import Any

from kafka.structs import TopicPartition

from embedstream.config import KafkaSettings
from embedstream.consume.deadletter import VALUE_DROPPED, dead_letter_headers
from embedstream.consume.member import Sender, Sending
from embedstream.consume.offsets import OffsetTracker
from embedstream.errors import DeliveryError
from embedstream.records import BadRecord

log = logging.getLogger("embedstream.worker")

_DLQ_HEADROOM = 64 * 1024  # room for headers and record framing
Covers = list[tuple[TopicPartition, int]]
_PendingSend = tuple[Sending, Covers]


class Outbox:
    """The loop's producer side: sends with the offsets each one finishes, dead letters, acks."""

    def __init__(
        self,
        kafka: KafkaSettings,
        worker_id: str,
        producer: Sender,
        tracker: OffsetTracker,
        dead_letter_counter: Callable[[str], Any],
    ) -> None:
        self.tracker = tracker
        self.acked = 0  # sends the broker acknowledged, ever
        self._kafka = kafka
        self._worker_id = worker_id
        self._producer = producer
        self._dead_letter_counter = dead_letter_counter
        self._pending: list[_PendingSend] = []

    @property
    def pending(self) -> int:
        """Sends not yet acknowledged by the broker."""
        return len(self._pending)

    def send(
        self, topic: str, value: bytes, key: bytes | None, headers: list[tuple[str, bytes]], covers: Covers
    ) -> None:
        fut = self._producer.send(topic, value=value, key=key, headers=headers)
        self._pending.append((fut, covers))

    def finish(self, covers: Covers) -> None:
        """Offsets whose work is durable without a send of ours (e.g. rows a store acknowledged)."""
        for tp, off in covers:
            self.tracker.done(tp, off)

    def dead_letter(self, bad: BadRecord, covers: Covers | None = None) -> None:
        """``covers``: the offsets this dead letter finishes, when the record stood for more than its message."""
        if bad.source.origin is not None:  # rewritten by a format layer: the dead letter is the message as consumed
            bad = dataclasses.replace(bad, source=bad.source.origin)
        src = bad.source
        log.info("dead letter %s: %s (%s)", src.coordinates, bad.reason, bad.message[:200])
        headers = dead_letter_headers(bad, self._worker_id)
        value = src.value
        if len(value) + _DLQ_HEADROOM > self._kafka.producer_max_request_bytes:
            # Too big to re-publish whole: keep the coordinates so it can be fetched from the source topic.
            headers.append((VALUE_DROPPED, str(len(value)).encode()))
            value = b""
        self.send(
            self._kafka.dead_letter_topic,
            value,
            src.key,
            headers,
            covers or [(TopicPartition(src.topic, src.partition), src.offset)],
        )
        self._dead_letter_counter(bad.reason).inc()

    def collect_acks(self, block: bool) -> None:
        """Finish the offsets of acknowledged sends (after flushing the producer when ``block``).

        Raises DeliveryError when the broker refused a send: its offsets must never be committed.
        """
        if block and self._pending:
            self._producer.flush(timeout=self._kafka.session_timeout_ms / 1000 * 10)
        still: list[_PendingSend] = []
        for fut, offsets in self._pending:
            if not fut.is_done:
                still.append((fut, offsets))
                continue
            if fut.failed():
                raise DeliveryError(f"broker did not acknowledge an output message: {fut.exception}")
            self.finish(offsets)
            self.acked += 1
        self._pending = still
