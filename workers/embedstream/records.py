"""The values that travel between the steps: a source message, a bad record, a deferred result, a row.

A modality's own record types (decoded images, token ids, windows) live in its module.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

# Stable, machine-readable dead-letter reasons (schemas/dead-letter.json lists the same set).
Reason = Literal[
    "empty",
    "oversize",
    "invalid_envelope",
    "undecodable",
    "unsupported_format",
    "decompression_bomb",
    "inference_rejected",
    "unknown_model",
    "invalid_utf8",
    # time series (schemas/timeseries-*.schema.json)
    "invalid_timeseries",
    "non_finite",
    "wrong_shape",
    "late",
    "evicted",
    "oversize_id",
    "oversize_headers",
    # embedstream sink: a store would not take the rows
    "store_rejected",
    # schema-registry records (input.format avro | protobuf | json_schema; docs/inputs.md)
    "not_registry_framed",
    "unknown_schema",
    "undecodable_record",
    "missing_field",
    "wrong_field_type",
    # images by reference (s3://, https://; [fetch])
    "fetch_not_found",
    "fetch_forbidden",
    "fetch_timeout",
    "fetch_too_large",
    "fetch_refused",
    "fetch_tls",
    "fetch_unavailable",
    "fetch_failed",
]
REASONS: tuple[str, ...] = Reason.__args__  # type: ignore[attr-defined]


# The per-message records are slotted, hashable and never mutated, but not frozen: a frozen
# dataclass's __init__ sets each field through object.__setattr__ (about 2.5 us against 0.3 for
# these), and the hot path makes one of each per consumed message or output row.
@dataclass(slots=True, unsafe_hash=True)
class SourceMessage:
    """A consumed Kafka message, reduced to what the pipeline needs."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes
    timestamp_ms: int
    headers: tuple[tuple[str, bytes], ...] = ()
    # Set where a format layer rewrote the consumed message into what the modality reads (a decoded
    # schema-registry record): the message as consumed, which dead letters carry, and its schema id.
    origin: SourceMessage | None = field(default=None, repr=False, compare=False)
    schema_id: int | None = None

    def header(self, name: str) -> bytes | None:
        for k, v in self.headers:
            if k.lower() == name:
                return v
        return None

    @property
    def coordinates(self) -> str:
        return f"{self.topic}/{self.partition}@{self.offset}"


@dataclass(frozen=True)
class BadRecord:
    """A message that cannot be embedded; it goes to the dead-letter topic, never up the stack."""

    source: SourceMessage
    reason: Reason
    message: str
    error_class: str = "ValueError"


@dataclass(frozen=True)
class Unavailable:
    """A message that cannot be decoded now because a service it needs is away (a schema registry).

    Not bad input: the loop holds it like a batch Triton could not take (partitions paused, probes
    with backoff) and reads it again from the log once the service answers; nothing at or after it
    in its partition is committed meanwhile.
    """

    source: SourceMessage
    reason: str


@dataclass(frozen=True)
class Deferred:
    """A modality's decode result when a message does not map to exactly one row of its own.

    Time-series observations are the case: a point joins its series' open window and only a later
    point completes a window row that stands for many messages. ``item`` is the row this message
    completed (None: the message was only absorbed into the modality's state); ``dead_letters``
    are other messages the modality gave up on meanwhile (e.g. the points of an evicted series).
    An absorbed message's offset stays unfinished until a row covers it or it is dead-lettered,
    so the partition's commit point stays behind it and a restart re-reads it.
    """

    item: Any | None = None
    dead_letters: tuple[BadRecord, ...] = ()


@dataclass(slots=True, unsafe_hash=True)
class RowMeta:
    """Per-row provenance carried from the input message to the output row.

    ``extra`` holds the modality's own columns by Arrow field name (the modality declares the fields).
    """

    key: bytes | None
    id: str
    topic: str
    partition: int
    offset: int
    timestamp_ms: int
    extra: Mapping[str, int | float | str | bool | None] = field(default_factory=dict)

    @classmethod
    def of(cls, source: SourceMessage, id: str, event_time_ms: int, extra: Mapping[str, Any] | None = None) -> RowMeta:
        """The row of a decoded item from its source message."""
        return cls(source.key, id, source.topic, source.partition, source.offset, event_time_ms, extra or {})
