"""The optional JSON envelope around a payload (``schemas/image-envelope.schema.json``).

A message is an envelope when its ``content-type`` header says ``application/json`` or, with no
such header, when its value starts with ``{``; JPEG, PNG and WebP never do.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass

import orjson

from embedstream.records import BadRecord, SourceMessage

JSON_CONTENT_TYPE = b"application/json"
ALLOWED_KEYS = frozenset({"id", "image", "event_time_ms", "metadata"})
_MAX_INT64 = 2**63 - 1  # the Arrow timestamp column is int64


@dataclass(frozen=True)
class Unwrapped:
    payload: bytes
    id: str
    event_time_ms: int


def is_envelope(msg: SourceMessage) -> bool:
    content_type = msg.header("content-type")
    if content_type is not None:
        return content_type.split(b";")[0].strip().lower() == JSON_CONTENT_TYPE
    return msg.value[:1] == b"{"


def default_id(msg: SourceMessage) -> str:
    if msg.key:
        try:
            return msg.key.decode("utf-8")
        except UnicodeDecodeError:
            return msg.key.hex()
    return msg.coordinates


def unwrap(msg: SourceMessage, payload_field: str = "image") -> Unwrapped | BadRecord:
    """Read the envelope; the payload field is base64. Any deviation from the schema is a BadRecord."""

    def bad(why: str, error_class: str = "ValueError") -> BadRecord:
        return BadRecord(msg, "invalid_envelope", f"JSON envelope: {why}", error_class)

    try:
        doc = orjson.loads(msg.value)
    except orjson.JSONDecodeError as exc:
        return bad(f"not valid JSON ({exc})", "JSONDecodeError")
    if not isinstance(doc, dict):
        return bad(f"expected an object, got {type(doc).__name__}")
    unknown = set(doc) - ALLOWED_KEYS
    if unknown:
        return bad(f"unknown fields {sorted(unknown)}")
    raw = doc.get(payload_field)
    if not isinstance(raw, str) or not raw:
        return bad(f"'{payload_field}' must be a non-empty base64 string")
    try:
        payload = base64.b64decode(raw, validate=True)
    except (binascii.Error, ValueError) as exc:
        return bad(f"'{payload_field}' is not valid base64 ({exc})", "binascii.Error")
    ident = doc.get("id", default_id(msg))
    if not isinstance(ident, str) or not ident:
        return bad("'id' must be a non-empty string")
    event_time = doc.get("event_time_ms", msg.timestamp_ms)
    if not isinstance(event_time, int) or isinstance(event_time, bool) or not 0 <= event_time <= _MAX_INT64:
        return bad("'event_time_ms' must be an integer from 0 to 2**63-1")
    if "metadata" in doc and not isinstance(doc["metadata"], dict):
        return bad("'metadata' must be an object")
    return Unwrapped(payload=payload, id=ident, event_time_ms=event_time)
