"""A modality reading schema-registry records (or forced envelopes): records become the modality's own input.

Wrapped around any modality, it decodes each record through the registry (``formats.registry``),
reads the mapped fields into the modality's JSON envelope (``formats.mapping``), and hands the
modality a message whose value is that envelope. The rewritten message keeps the consumed one as
its ``origin``, so dead letters carry the bytes as consumed, and its schema id, which the row keeps.

A registry that does not answer stops decoding of that partition at the first message it could not
decode: that message and the ones after it in the same poll come back as ``Unavailable``, and the loop
reads them again once the registry is back, so a time series is windowed in offset order whatever
happened in between.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
from kafka.structs import TopicPartition

from embedstream.config import FieldMapping, Settings
from embedstream.formats.mapping import ENVELOPES, FieldProblem
from embedstream.formats.registry import RecordDecoder, Refused, RegistryDown
from embedstream.modalities import Modality
from embedstream.records import BadRecord, Deferred, RowMeta, SourceMessage, Unavailable

JSON_HEADERS = (("content-type", b"application/json"),)


class RecordInput:
    """The modality, reading records: decode and map here, everything else delegated."""

    def __init__(self, inner: Modality, settings: Settings, decoder: RecordDecoder | None = None) -> None:
        self._inner = inner
        self.name = inner.name
        self.fields: tuple[pa.Field, ...] = inner.fields
        self._fields: FieldMapping = settings.input.fields
        self._envelope: Callable[[Any, FieldMapping], bytes | FieldProblem] = ENVELOPES[inner.name]
        self._decoder = (
            decoder if decoder is not None or not settings.input.from_registry else RecordDecoder(settings.input)
        )

    # -- decode --------------------------------------------------------------------------------------

    def decode(self, msg: SourceMessage) -> Any | BadRecord | Deferred | Unavailable:
        return self.decode_many([msg])[0]

    def decode_many(self, msgs: Sequence[SourceMessage]) -> list[Any]:
        out: list[Any] = [None] * len(msgs)
        rewritten: list[tuple[int, SourceMessage]] = []
        stopped: set[tuple[str, int]] = set()
        for i, msg in enumerate(msgs):
            where = (msg.topic, msg.partition)
            result: SourceMessage | BadRecord | Unavailable
            if where in stopped:
                out[i] = Unavailable(msg, "schema registry unavailable")
                continue
            result = self._rewrite(msg)
            if isinstance(result, Unavailable):
                stopped.add(where)
                out[i] = result
            elif isinstance(result, BadRecord):
                out[i] = result
            else:
                rewritten.append((i, result))
        if rewritten:
            decoded = self._inner.decode_many([m for _, m in rewritten])
            for (i, _), item in zip(rewritten, decoded, strict=True):
                out[i] = item
        return out

    def _rewrite(self, msg: SourceMessage) -> SourceMessage | BadRecord | Unavailable:
        if not msg.value:
            return msg  # the modality names an empty message
        if self._decoder is None:  # input.format = envelope: every message is the modality's envelope
            headers = tuple(h for h in msg.headers if h[0].lower() != "content-type") + JSON_HEADERS
            return dataclasses.replace(msg, headers=headers, origin=msg)
        decoded = self._decoder(msg.value, msg.topic)
        if isinstance(decoded, RegistryDown):
            return Unavailable(msg, decoded.message)
        if isinstance(decoded, Refused):
            return BadRecord(msg, decoded.reason, decoded.message, decoded.error_class)  # type: ignore[arg-type]
        envelope = self._envelope(decoded.value, self._fields)
        if isinstance(envelope, FieldProblem):
            return BadRecord(msg, envelope.reason, f"schema id {decoded.schema_id}: {envelope.message}")  # type: ignore[arg-type]
        return SourceMessage(
            msg.topic, msg.partition, msg.offset, msg.key, envelope, msg.timestamp_ms, JSON_HEADERS,
            origin=msg, schema_id=decoded.schema_id,
        )  # fmt: skip

    # -- the rest is the modality's ----------------------------------------------------------------------

    def prepare(self, items: Sequence[Any]) -> Sequence[Any]:
        return self._inner.prepare(items)

    def stack(self, items: Sequence[Any]) -> tuple[np.ndarray, ...]:
        return self._inner.stack(items)

    def row(self, item: Any) -> RowMeta:
        meta = self._inner.row(item)
        return dataclasses.replace(meta, extra={**meta.extra, "schema_id": item.source.schema_id})

    def covers(self, item: Any) -> list[tuple[TopicPartition, int]]:
        return self._inner.covers(item)

    def event_time_ms(self, item: Any) -> int:
        return self._inner.event_time_ms(item)

    def forget(self, partitions: Sequence[TopicPartition]) -> None:
        self._inner.forget(partitions)

    def sources_ready(self) -> bool:
        """The outage probe's question: do the registry and whatever the modality fetches from answer?"""
        from embedstream.formats import sources_ready

        registry = self._decoder is None or self._decoder.ready()
        return registry and sources_ready(self._inner)
