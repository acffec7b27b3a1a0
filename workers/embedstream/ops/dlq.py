"""``embedstream dlq list|redrive``: what is in a dead-letter topic, and sending it back to be embedded."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from kafka.consumer.fetcher import ConsumerRecord

from embedstream.consume import deadletter as dl
from embedstream.ops.kafka import header_dict


@dataclass(frozen=True)
class DeadLetterRow:
    partition: int
    offset: int
    key: bytes | None
    size: int
    reason: str
    error_class: str
    message: str
    source: str
    value_dropped: int | None

    @classmethod
    def of(cls, rec: ConsumerRecord) -> DeadLetterRow:
        h = header_dict(rec.headers)

        def text(name: str, default: str = "?") -> str:
            return h[name].decode("utf-8", "replace") if name in h else default

        dropped = h.get(dl.VALUE_DROPPED)
        return cls(
            partition=rec.partition,
            offset=rec.offset,
            key=rec.key,
            size=len(rec.value or b""),
            reason=text(dl.REASON),
            error_class=text(dl.ERROR_CLASS, ""),
            message=text(dl.MESSAGE, ""),
            source=f"{text(dl.SOURCE_TOPIC)}/{text(dl.SOURCE_PARTITION)}@{text(dl.SOURCE_OFFSET)}",
            value_dropped=int(dropped) if dropped is not None and dropped.isdigit() else None,
        )

    def key_text(self) -> str:
        # Keys are ids, not payloads; still, undecodable bytes are shown escaped, never raw.
        return "" if self.key is None else self.key.decode("utf-8", "backslashreplace")


def reason_counts(rows: list[DeadLetterRow]) -> list[tuple[str, int]]:
    return Counter(r.reason for r in rows).most_common()


def original_headers(headers: list[tuple[str, bytes]] | None) -> list[tuple[str, bytes]]:
    """The input message's own headers: ours (embedstream.dlq.*) removed, order kept."""
    return [(k, v) for k, v in headers or [] if not k.startswith(dl.HEADER_PREFIX)]


@dataclass
class RedrivePlan:
    send: list[ConsumerRecord]
    dropped: list[DeadLetterRow]  # value not in the dead letter: cannot be re-driven from here
    other_reason: int


def plan_redrive(records: list[ConsumerRecord], reason: str | None) -> RedrivePlan:
    plan = RedrivePlan([], [], 0)
    for rec in records:
        row = DeadLetterRow.of(rec)
        if reason is not None and row.reason != reason:
            plan.other_reason += 1
        elif row.value_dropped is not None:
            plan.dropped.append(row)
        else:
            plan.send.append(rec)
    return plan


def redrive_message(rec: ConsumerRecord, to_topic: str) -> dict[str, object]:
    # No partition: the input topic's partitioner places it by key, as for the original producer.
    return {"topic": to_topic, "key": rec.key, "value": rec.value, "headers": original_headers(rec.headers)}
