"""The optional JSON envelope around a payload (``schemas/image-envelope.schema.json``).

A message is an envelope when its ``content-type`` header says ``application/json`` or, with no
such header, when its value starts with ``{``; JPEG, PNG and WebP never do.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from typing import Any

import orjson

from embedstream.records import BadRecord, SourceMessage

JSON_CONTENT_TYPE = b"application/json"
# "uri": a reference to the image instead of its bytes (the image modality reads it, modalities/image.py).
ALLOWED_KEYS = frozenset({"id", "image", "uri", "event_time_ms", "metadata"})
MAX_INT64 = 2**63 - 1  # the Arrow timestamp column is int64


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


def _bad(msg: SourceMessage, why: str, error_class: str = "ValueError") -> BadRecord:
    return BadRecord(msg, "invalid_envelope", f"JSON envelope: {why}", error_class)


def parse_object(msg: SourceMessage, raw: bytes | str, allowed: frozenset[str]) -> dict[str, Any] | BadRecord:
    """The envelope as a JSON object with only the ``allowed`` fields, or a BadRecord."""
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        return _bad(msg, f"not valid JSON ({exc})", "JSONDecodeError")
    if not isinstance(doc, dict):
        return _bad(msg, f"expected an object, got {type(doc).__name__}")
    unknown = set(doc) - allowed
    if unknown:
        return _bad(msg, f"unknown fields {sorted(unknown)}")
    return doc


def read_meta(msg: SourceMessage, doc: dict[str, Any]) -> tuple[str, int] | BadRecord:
    """The fields every envelope shares: ``id`` (default: the key) and ``event_time_ms``; ``metadata`` checked."""
    ident = doc.get("id", default_id(msg))
    if not isinstance(ident, str) or not ident:
        return _bad(msg, "'id' must be a non-empty string")
    event_time = doc.get("event_time_ms", msg.timestamp_ms)
    if not isinstance(event_time, int) or isinstance(event_time, bool) or not 0 <= event_time <= MAX_INT64:
        return _bad(msg, "'event_time_ms' must be an integer from 0 to 2**63-1")
    if "metadata" in doc and not isinstance(doc["metadata"], dict):
        return _bad(msg, "'metadata' must be an object")
    return ident, event_time


def unwrap(msg: SourceMessage, payload_field: str = "image") -> Unwrapped | BadRecord:
    """Read the envelope; the payload field is base64. Any deviation from the schema is a BadRecord."""
    doc = parse_object(msg, msg.value, ALLOWED_KEYS)
    if isinstance(doc, BadRecord):
        return doc
    return unwrap_object(msg, doc, payload_field)


def unwrap_object(msg: SourceMessage, doc: dict[str, Any], payload_field: str = "image") -> Unwrapped | BadRecord:
    """``unwrap`` of an envelope already parsed."""
    raw = doc.get(payload_field)
    if not isinstance(raw, str) or not raw:
        return _bad(msg, f"'{payload_field}' must be a non-empty base64 string")
    try:
        payload = base64.b64decode(raw, validate=True)
    except (binascii.Error, ValueError) as exc:
        return _bad(msg, f"'{payload_field}' is not valid base64 ({exc})", "binascii.Error")
    meta = read_meta(msg, doc)
    if isinstance(meta, BadRecord):
        return meta
    return Unwrapped(payload=payload, id=meta[0], event_time_ms=meta[1])
