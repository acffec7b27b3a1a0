"""What enters the loop: a consumed Kafka record as a SourceMessage; a stage's decode results sorted."""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

from embedstream.records import BadRecord, Deferred, SourceMessage, Unavailable


def source_message(rec: Any) -> SourceMessage:
    """A kafka-python ConsumerRecord, reduced to what the pipeline needs."""
    return SourceMessage(
        topic=rec.topic,
        partition=rec.partition,
        offset=rec.offset,
        key=rec.key,
        value=rec.value or b"",
        timestamp_ms=rec.timestamp if rec.timestamp and rec.timestamp > 0 else int(time.time() * 1000),
        headers=tuple((k, v or b"") for k, v in rec.headers) if rec.headers else (),
    )


def sort_decoded(decoded: Iterable[Any]) -> tuple[list[Any], list[BadRecord], list[Unavailable]]:
    """A modality's decode results -> (items for the model, dead letters, messages to read again), in input order.

    A Deferred contributes the row it completed (if any) and the messages the modality gave up on;
    an absorbed message contributes nothing yet: the row or dead letter that covers it finishes it.
    """
    items: list[Any] = []
    bad: list[BadRecord] = []
    again: list[Unavailable] = []
    for item in decoded:
        if isinstance(item, Unavailable):
            again.append(item)
            continue
        if isinstance(item, Deferred):
            bad.extend(item.dead_letters)
            item = item.item
            if item is None:
                continue
        if isinstance(item, BadRecord):
            bad.append(item)
        else:
            items.append(item)
    return items, bad, again
