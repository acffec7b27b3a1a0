"""Time-series messages: one observation or one whole window per message, as JSON.

``schemas/timeseries-observation.schema.json`` and ``schemas/timeseries-window.schema.json``
describe the two shapes; a message is a window when its ``values`` is a list of lists. JSON has no
NaN: the parser still accepts the common non-standard ``NaN``/``Infinity`` tokens (and ``null``)
so that such values reach the check that dead-letters them as ``non_finite`` instead of being
lumped with unparseable bytes.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson
from kafka.structs import TopicPartition

from embedstream.decode.envelope import MAX_INT64
from embedstream.records import BadRecord, SourceMessage

OBSERVATION_KEYS = frozenset({"series_id", "timestamp_ms", "values", "metadata"})
WINDOW_KEYS = frozenset({"series_id", "start_ms", "end_ms", "values", "metadata"})


@dataclass(frozen=True)
class Observation:
    """One point of one series: ``values`` holds one float32 per channel."""

    source: SourceMessage
    series_id: str
    timestamp_ms: int
    values: np.ndarray = field(repr=False)


@dataclass(frozen=True)
class TimeSeriesWindow:
    """A (T x C) float32 window ready for the model.

    ``source`` is the message that completed it (its own message for a window message; the newest
    point for a window built from observations). ``covers`` are the input offsets this row
    *finishes*: for a built window, the points that will not be part of any later window of the
    series (see ``modalities/timeseries.py``); the worker marks them done when the row is acked.
    """

    source: SourceMessage
    series_id: str
    start_ms: int
    end_ms: int
    values: np.ndarray = field(repr=False)
    covers: tuple[tuple[TopicPartition, int], ...]

    @property
    def points(self) -> int:
        return int(self.values.shape[0])


def _loads(raw: bytes) -> Any:
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        # orjson is strict about NaN/Infinity; the stdlib parser reads them, so they can be named non_finite.
        return json.loads(raw)


_FLOAT32_MAX = float(np.finfo(np.float32).max)
# What a JSON number (or null) parses to; bool is deliberately absent although it subclasses int.
_NUMERIC_TYPES = frozenset({int, float, type(None)})


def _timestamp(doc: dict[str, Any], name: str, default: int) -> int | None:
    v = doc.get(name, default)
    if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v <= MAX_INT64:
        return None
    return v


def parse_timeseries(
    msg: SourceMessage, window_length: int, channels: int, max_bytes: int
) -> Observation | TimeSeriesWindow | BadRecord:
    """Bytes -> an observation, a window, or a BadRecord; never raises on bad input."""

    def bad(reason: str, why: str, error_class: str = "ValueError") -> BadRecord:
        return BadRecord(msg, reason, why, error_class)  # type: ignore[arg-type]

    if not msg.value:
        return bad("empty", "empty message")
    if len(msg.value) > max_bytes:
        return bad("oversize", f"{len(msg.value)} bytes > timeseries.max_message_bytes {max_bytes}")
    try:
        doc = _loads(msg.value)
    except (ValueError, RecursionError) as exc:
        return bad("invalid_timeseries", f"not valid JSON ({exc})", type(exc).__name__)
    if not isinstance(doc, dict):
        return bad("invalid_timeseries", f"expected a JSON object, got {type(doc).__name__}")
    series_id = doc.get("series_id")
    if not isinstance(series_id, str) or not series_id:
        return bad("invalid_timeseries", "'series_id' must be a non-empty string")
    if "metadata" in doc and not isinstance(doc["metadata"], dict):
        return bad("invalid_timeseries", "'metadata' must be an object")
    values = doc.get("values")
    if not isinstance(values, list) or not values:
        return bad("invalid_timeseries", "'values' must be a non-empty array")
    is_window = isinstance(values[0], list)
    allowed = WINDOW_KEYS if is_window else OBSERVATION_KEYS
    if not allowed.issuperset(doc):
        unknown = set(doc) - allowed
        kind = "window" if is_window else "observation"
        return bad("invalid_timeseries", f"unknown fields {sorted(unknown)} for a {kind}")

    rows = values if is_window else [values]
    # One pass over the element types in C rather than a Python check per value: this is the hot loop.
    if is_window:
        numbers = all(type(row) is list for row in rows) and _NUMERIC_TYPES.issuperset(
            map(type, itertools.chain.from_iterable(rows))
        )
    else:
        numbers = _NUMERIC_TYPES.issuperset(map(type, values))
    if not numbers:
        return bad("invalid_timeseries", "'values' must hold numbers (a window: arrays of numbers)")
    if is_window and len(rows) != window_length:
        return bad("wrong_shape", f"window of {len(rows)} points, the model takes {window_length}")
    widths = {len(row) for row in rows}
    if widths != {channels}:
        return bad("wrong_shape", f"{sorted(widths)} channels, the model takes {channels}")
    if not is_window:
        # A handful of numbers: checked in Python, where each numpy call would cost more than the
        # check. NaN fails both comparisons; a huge integer compares exactly and fails too.
        n = sum(1 for v in values if v is None or not -_FLOAT32_MAX <= v <= _FLOAT32_MAX)
        if n:
            return bad("non_finite", f"{n} value(s) are null, NaN, infinite or beyond float32")
        arr32 = np.array(values, dtype=np.float32)
    else:
        try:
            arr = np.array(rows, dtype=np.float64)  # null becomes NaN, dead-lettered as non_finite below
        except OverflowError as exc:  # integers beyond float range
            return bad("non_finite", f"value out of range ({exc})", "OverflowError")
        # One reduction catches NaN (from null), infinities and values beyond float32 (NaN compares
        # false), before the cast, so the cast never overflows and no numpy error state is needed.
        magnitude = np.abs(arr)
        if not magnitude.max() <= _FLOAT32_MAX:
            n = int((~(magnitude <= _FLOAT32_MAX)).sum())
            return bad("non_finite", f"{n} value(s) are null, NaN, infinite or beyond float32")
        arr32 = arr.astype(np.float32)

    if not is_window:
        ts = _timestamp(doc, "timestamp_ms", -1) if "timestamp_ms" in doc else None
        if ts is None:
            return bad("invalid_timeseries", "'timestamp_ms' is required: an integer from 0 to 2**63-1")
        return Observation(msg, series_id, ts, arr32)
    end = _timestamp(doc, "end_ms", msg.timestamp_ms)
    start = _timestamp(doc, "start_ms", end if end is not None else 0)
    if start is None or end is None or start > end:
        return bad("invalid_timeseries", "'start_ms'/'end_ms' must be integers from 0 to 2**63-1, start <= end")
    return TimeSeriesWindow(
        msg, series_id, start, end, arr32, ((TopicPartition(msg.topic, msg.partition), msg.offset),)
    )
