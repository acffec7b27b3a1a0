"""A decoded record's fields, read through ``[input.fields]``, as the modality's own JSON envelope.

The modality then decodes the envelope as if the producer had sent it, with every guard it has; so a
record needs no code in the modality, and a time-series record is windowed exactly like the same
observation sent as JSON. A mapped field that is absent is ``missing_field``; one of the wrong type
``wrong_field_type`` (``id`` may be a string or an integer; times are integers of milliseconds, or
the timestamps Avro's ``timestamp-millis``/``-micros`` logical types decode to).
"""

from __future__ import annotations

import base64
import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from embedstream.config import FieldMapping

_ABSENT = object()


@dataclass(frozen=True)
class FieldProblem:
    reason: str  # missing_field | wrong_field_type
    message: str


def lookup(record: Any, path: str) -> Any:
    """The value at a dotted path (``payload.reading.values``), or ``_ABSENT``; a null counts as absent."""
    value = record
    for part in path.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return _ABSENT
        value = value[part]
    return _ABSENT if value is None else value


class _Reader:
    def __init__(self, record: Any, fields: FieldMapping) -> None:
        self.record = record
        self.fields = fields

    def required(self, name: str) -> Any:
        path = getattr(self.fields, name)
        value = lookup(self.record, path)
        if value is _ABSENT:
            raise _Problem("missing_field", f"record has no field {path!r} (input.fields.{name})")
        return value

    def optional(self, name: str) -> Any:
        path = getattr(self.fields, name)
        return None if path is None else lookup(self.record, path)

    def wrong(self, name: str, value: Any, expected: str) -> _Problem:
        path = getattr(self.fields, name)
        return _Problem(
            "wrong_field_type", f"field {path!r} (input.fields.{name}) is {_kind(value)}, expected {expected}"
        )


class _Problem(Exception):
    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.problem = FieldProblem(reason, message)


def _kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _millis(reader: _Reader, name: str, value: Any) -> int:
    if isinstance(value, dt.datetime):
        aware = value if value.tzinfo is not None else value.replace(tzinfo=dt.UTC)
        return int(aware.timestamp() * 1000)
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    raise reader.wrong(name, value, "an integer of milliseconds or a timestamp")


def _common(reader: _Reader, doc: dict[str, Any], time_key: str = "event_time_ms") -> None:
    ident = reader.optional("id")
    if ident is not _ABSENT and ident is not None:
        if isinstance(ident, bool) or not isinstance(ident, (str, int)):
            raise reader.wrong("id", ident, "a string or an integer")
        doc["id"] = str(ident)
    elif reader.fields.id is not None:
        raise _Problem("missing_field", f"record has no field {reader.fields.id!r} (input.fields.id)")
    when = reader.optional("event_time")
    if when is not _ABSENT and when is not None:
        doc[time_key] = _millis(reader, "event_time", when)
    elif reader.fields.event_time is not None:
        path = reader.fields.event_time
        raise _Problem("missing_field", f"record has no field {path!r} (input.fields.event_time)")


def text_envelope(record: Any, fields: FieldMapping) -> bytes | FieldProblem:
    """``schemas/text-envelope.schema.json`` from the mapped text, id and event time."""
    reader = _Reader(record, fields)
    try:
        text = reader.required("text")
        if not isinstance(text, str):
            raise reader.wrong("text", text, "a string")
        doc: dict[str, Any] = {"text": text}
        _common(reader, doc)
    except _Problem as exc:
        return exc.problem
    return _dumps(doc, "text")


def image_envelope(record: Any, fields: FieldMapping) -> bytes | FieldProblem:
    """``schemas/image-envelope.schema.json``: the image's bytes (base64) or its reference (``uri``)."""
    reader = _Reader(record, fields)
    try:
        image = reader.required("image")
        doc: dict[str, Any]
        if isinstance(image, (bytes, bytearray, memoryview)):
            doc = {"image": base64.b64encode(bytes(image)).decode("ascii")}
        elif isinstance(image, str):
            # JSON has no bytes: a string is a reference, or base64 when it is no URI.
            doc = {"uri": image} if "://" in image[:16] else {"image": image}
        else:
            raise reader.wrong("image", image, "bytes or a string (a reference)")
        _common(reader, doc)
    except _Problem as exc:
        return exc.problem
    return _dumps(doc, "image")


def timeseries_document(record: Any, fields: FieldMapping) -> bytes | FieldProblem:
    """An observation (``schemas/timeseries-observation.schema.json``) or a window (``-window``).

    The values are passed on as they are: the modality's own checks name wrong shapes and non-finite
    numbers, as for JSON input. Protobuf has no nested arrays, so a window of messages that each hold
    one repeated field (``[{"v": [..]}, ...]``) is read as those arrays.
    """
    reader = _Reader(record, fields)
    try:
        series = reader.required("series_id")
        if isinstance(series, bool) or not isinstance(series, (str, int)):
            raise reader.wrong("series_id", series, "a string or an integer")
        values = reader.required("values")
        if not isinstance(values, list):
            raise reader.wrong("values", values, "an array of numbers, or of arrays of numbers")
        values = [_row(v) for v in values]
        doc: dict[str, Any] = {"series_id": str(series), "values": values}
        if values and isinstance(values[0], list):
            for name, key in (("window_start", "start_ms"), ("window_end", "end_ms")):
                when = reader.optional(name)
                if when is not _ABSENT and when is not None:
                    doc[key] = _millis(reader, name, when)
        else:
            doc["timestamp_ms"] = _millis(reader, "timestamp", reader.required("timestamp"))
    except _Problem as exc:
        return exc.problem
    return _dumps(doc, "values")


def _dumps(doc: dict[str, Any], name: str) -> bytes | FieldProblem:
    try:
        return orjson.dumps(doc)
    except (TypeError, orjson.JSONEncodeError) as exc:  # e.g. an integer beyond 64 bits, an Avro decimal
        return FieldProblem("wrong_field_type", f"input.fields.{name}: a value JSON cannot carry ({exc})")


def _row(value: Any) -> Any:
    if isinstance(value, Mapping) and len(value) == 1:
        (inner,) = value.values()
        if isinstance(inner, list):
            return inner
    return value


ENVELOPES = {"text": text_envelope, "image": image_envelope, "timeseries": timeseries_document}
