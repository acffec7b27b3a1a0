"""Time series: observations windowed per series, or whole windows, -> (T x C) float32 model input.

Messages are JSON, one observation or one whole window each (``schemas/timeseries-observation.schema.json``
and ``schemas/timeseries-window.schema.json``); a message is a window when its ``values`` is a list
of lists. JSON has no NaN: the parser still accepts the common non-standard ``NaN``/``Infinity``
tokens (and ``null``) so that such values reach the check that dead-letters them as ``non_finite``
instead of being lumped with unparseable bytes.

Window length T and channel count C come from the model (the encoder spec, i.e. what it was
trained on); the stride and the memory bounds from ``[timeseries]`` settings. Windowing is by
point count and event time only; it never reads a clock.

The rules (also in ``schemas/timeseries-observation.schema.json``):

* **Windows.** Each series (keyed by topic, partition and ``series_id``) keeps its last T points.
  When it holds T points it emits a window row, then drops its oldest ``stride`` points. With
  stride S < T consecutive windows overlap by T - S points; stride > T is refused (points would
  fall between windows). Producers should key observations by series id so a series stays on one
  partition; a series spread over partitions is windowed per partition.
* **Which offsets a window finishes.** A point is finished by the *last* window that contains it:
  the S points dropped after an emission are that window's ``covers`` (the row's
  ``messages_finished``); the worker marks exactly those offsets done when the row is acked. Points
  still in a series' buffer stay unfinished, so the partition's committed offset stays behind the
  oldest of them. A window message (a whole window in one message) is one row finishing itself.
* **Late and out-of-order points.** A point whose ``timestamp_ms`` is not after the last accepted
  point of its series is dead-lettered with reason ``late`` (no reordering buffer). Bad points
  (``non_finite``, ``wrong_shape``, ``invalid_timeseries``) are dead-lettered and skipped: the
  window is built from the valid points around them, without imputation.
* **Memory and eviction.** At most ``max_series`` series are held per worker; a new series evicts
  the least recently updated one. With ``idle_evict_ms`` set, a least recently updated series whose
  newest point is that far (event time) behind the newest point of its partition is evicted too.
  The unfinished points of an evicted series are dead-lettered with reason ``evicted`` (their
  original bytes, so they can be replayed), so they never hold commits back; a later point of that
  series starts a new window. Memory is bounded by count, max_series x T points, and in bytes:
  the held points (raw message, key, headers, series id, values, object overheads) and series stay
  within ``max_state_bytes``; over it the least recently updated series are evicted the same way
  (the current one last). A series id or key over ``max_id_bytes`` is dead-lettered ``oversize_id``
  and headers over ``max_header_bytes`` ``oversize_headers``, before anything is held
  (docs/memory.md).
* **Restart and rebalance.** Window state lives in memory only and is rebuilt from the log: after
  a crash, a restart or losing a partition, the next owner re-reads from the committed offset, which
  is at or before the oldest unfinished point of every series, so no window is lost silently. For
  the series whose oldest point set the commit point the rebuilt windows are exactly the ones it
  would have emitted. Other series of the partition re-read points that were already finished:
  their windows from that stretch may be published again (at-least-once duplicates) and their
  boundaries after the restart start from the first re-read point.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
import orjson
import pyarrow as pa
from kafka.structs import TopicPartition

from embedstream.config import Settings
from embedstream.encoders import EncoderSpec
from embedstream.errors import ConfigError
from embedstream.modalities import ModalityDefaults, ModalityTopics, register_modality
from embedstream.modalities._envelope import MAX_INT64
from embedstream.modalities._windows import Observation, SlidingWindows, TimeSeriesWindow
from embedstream.records import BadRecord, Deferred, Reason, RowMeta, SourceMessage

__all__ = [
    "DEFAULTS",
    "FIELDS",
    "OBSERVATION_KEYS",
    "WINDOW_KEYS",
    "Observation",
    "SlidingWindows",
    "TimeSeriesModality",
    "TimeSeriesWindow",
    "parse_timeseries",
]

FIELDS: tuple[pa.Field, ...] = (
    pa.field("series_id", pa.string(), nullable=False),
    pa.field("window_start", pa.timestamp("ms", tz="UTC"), nullable=False),
    pa.field("window_end", pa.timestamp("ms", tz="UTC"), nullable=False),
    pa.field("points", pa.int32(), nullable=False),
    pa.field("messages_finished", pa.int32(), nullable=False),
)
_ABSORBED = Deferred()

OBSERVATION_KEYS = frozenset({"series_id", "timestamp_ms", "values", "metadata"})
WINDOW_KEYS = frozenset({"series_id", "start_ms", "end_ms", "values", "metadata"})


def _loads(raw: bytes) -> Any:
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        # orjson is strict about NaN/Infinity; the stdlib parser reads them, so they can be named non_finite.
        return json.loads(raw)


_FLOAT32_MAX = float(np.finfo(np.float32).max)
# What a JSON number (or null) parses to; bool is deliberately absent although it subclasses int.
_NUMERIC_TYPES = frozenset({int, float, type(None)})
_LIST = {list}


def _timestamp(doc: dict[str, Any], name: str, default: int) -> int | None:
    v = doc.get(name, default)
    if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v <= MAX_INT64:
        return None
    return v


# A rejection: (reason, message, error class) for the BadRecord.
_Why = tuple[Reason, str, str]


class _WindowDoc(NamedTuple):
    """A window message whose document passed every check but the values' finiteness, not yet converted."""

    msg: SourceMessage
    doc: dict[str, Any]


def parse_timeseries(
    msg: SourceMessage,
    window_length: int,
    channels: int,
    max_bytes: int,
    max_id_bytes: int | None = None,
    max_header_bytes: int | None = None,
) -> Observation | TimeSeriesWindow | BadRecord:
    """Bytes -> an observation, a window, or a BadRecord; never raises on bad input.

    ``max_id_bytes`` caps the key and the series id, ``max_header_bytes`` the headers (None: no cap).
    """
    checked = _checked(msg, window_length, channels, max_bytes, max_id_bytes, max_header_bytes)
    if isinstance(checked, _WindowDoc):
        return _windows([checked], window_length, channels)[0]
    return checked


def _checked(
    msg: SourceMessage,
    window_length: int,
    channels: int,
    max_bytes: int,
    max_id_bytes: int | None,
    max_header_bytes: int | None,
) -> Observation | _WindowDoc | BadRecord:
    """Every check of ``parse_timeseries``; a window's values are converted later, with its poll's (``_windows``)."""
    why = _oversize_meta(msg, max_id_bytes, max_header_bytes)
    if why is not None:
        return BadRecord(msg, *why)
    doc = _document(msg, max_bytes, max_id_bytes)
    if isinstance(doc, tuple):
        return BadRecord(msg, *doc)
    values = doc["values"]
    if isinstance(values[0], list):
        return _WindowDoc(msg, doc)  # its shape and types are checked with its poll's (``_windows``)
    why = _shape_problem([values], False, window_length, channels)
    if why is not None:
        return BadRecord(msg, *why)
    arr32 = _point_values(values)
    if isinstance(arr32, tuple):
        return BadRecord(msg, *arr32)
    return _observation(msg, doc, arr32)


def _windows(docs: Sequence[_WindowDoc], length: int, channels: int) -> list[TimeSeriesWindow | BadRecord]:
    """Window documents -> windows or BadRecords, checked and converted together: the shape and type
    checks run once over every row and value of the poll (in C: ``map``, ``set``), and only a poll
    that fails them is checked message by message to name the bad ones. Each message's own check
    would cost more in Python calls than its values cost to check (the window messages' hot path)."""
    values = [d.doc["values"] for d in docs]
    rows = list(itertools.chain.from_iterable(values))
    if (
        set(map(len, values)) == {length}
        and set(map(type, rows)) == _LIST
        and set(map(len, rows)) == {channels}
        and _NUMERIC_TYPES.issuperset(map(type, itertools.chain.from_iterable(rows)))
    ):
        return _converted(docs, length, channels)
    out: list[TimeSeriesWindow | BadRecord | None] = []
    good: list[_WindowDoc] = []
    for d in docs:
        why = _shape_problem(d.doc["values"], True, length, channels)
        if why is None:
            good.append(d)
            out.append(None)
        else:
            out.append(BadRecord(d.msg, *why))
    made = iter(_converted(good, length, channels))
    return [next(made) if item is None else item for item in out]


def _converted(checked: Sequence[_WindowDoc], length: int, channels: int) -> list[TimeSeriesWindow | BadRecord]:
    """Window documents of the right shape and types -> windows, converted together: one C pass over
    every value of the poll and one finiteness reduction, instead of a nested ``np.array`` and
    reductions per message. The types were checked (numbers or null), so the conversion cannot
    misread a boolean or a string; null becomes NaN and is dead-lettered as ``non_finite``."""
    if not checked:
        return []
    n, size = len(checked), length * channels
    values = itertools.chain.from_iterable(itertools.chain.from_iterable(c.doc["values"] for c in checked))
    try:
        flat = np.fromiter(values, np.float64, n * size)
    except OverflowError as exc:  # an integer beyond float range: each window on its own, to name the one
        if n == 1:
            return [BadRecord(checked[0].msg, "non_finite", f"value out of range ({exc})", "OverflowError")]
        return [w for c in checked for w in _converted([c], length, channels)]
    # NaN (from null) fails the comparison, as do infinities and values beyond float32, so the
    # cast below is taken only by values that fit it.
    fits = (np.abs(flat) <= _FLOAT32_MAX).reshape(n, size)
    bad = None if fits.all() else size - fits.sum(axis=1)
    with np.errstate(over="ignore", invalid="ignore"):
        arr32 = flat.astype(np.float32).reshape(n, length, channels)
    out: list[TimeSeriesWindow | BadRecord] = []
    partitions: dict[tuple[str, int], TopicPartition] = {}
    for i, (msg, doc) in enumerate(checked):
        if bad is not None and bad[i]:
            why = f"{bad[i]} value(s) are null, NaN, infinite or beyond float32"
            out.append(BadRecord(msg, "non_finite", why, "ValueError"))
            continue
        tp = partitions.get((msg.topic, msg.partition))
        if tp is None:
            tp = partitions[(msg.topic, msg.partition)] = TopicPartition(msg.topic, msg.partition)
        out.append(_window(msg, doc, arr32[i], tp))
    return out


def _oversize_meta(msg: SourceMessage, max_id_bytes: int | None, max_header_bytes: int | None) -> _Why | None:
    """A key or headers too large to hold with a buffered point; checked before the value is parsed."""
    if max_id_bytes is not None and msg.key is not None and len(msg.key) > max_id_bytes:
        return "oversize_id", f"key of {len(msg.key)} bytes > timeseries.max_id_bytes {max_id_bytes}", "ValueError"
    if max_header_bytes is not None and msg.headers:
        size = sum(len(name.encode()) + len(value or b"") for name, value in msg.headers)
        if size > max_header_bytes:
            why = f"headers of {size} bytes > timeseries.max_header_bytes {max_header_bytes}"
            return "oversize_headers", why, "ValueError"
    return None


def _document(msg: SourceMessage, max_bytes: int, max_id_bytes: int | None = None) -> dict[str, Any] | _Why:
    """The JSON object with a series id, non-empty values and only the fields its shape allows."""
    if not msg.value:
        return "empty", "empty message", "ValueError"
    if len(msg.value) > max_bytes:
        return "oversize", f"{len(msg.value)} bytes > timeseries.max_message_bytes {max_bytes}", "ValueError"
    try:
        doc = _loads(msg.value)
    except (ValueError, RecursionError) as exc:
        return "invalid_timeseries", f"not valid JSON ({exc})", type(exc).__name__
    if not isinstance(doc, dict):
        return "invalid_timeseries", f"expected a JSON object, got {type(doc).__name__}", "ValueError"
    series_id = doc.get("series_id")
    if not isinstance(series_id, str) or not series_id:
        return "invalid_timeseries", "'series_id' must be a non-empty string", "ValueError"
    # len(str) <= its UTF-8 length <= 4 x len(str): encode only where the answer is not already known.
    if max_id_bytes is not None and len(series_id) * 4 > max_id_bytes:
        id_bytes = len(series_id.encode("utf-8", "surrogatepass"))
        if id_bytes > max_id_bytes:
            why = f"'series_id' of {id_bytes} bytes > timeseries.max_id_bytes {max_id_bytes}"
            return "oversize_id", why, "ValueError"
    if "metadata" in doc and not isinstance(doc["metadata"], dict):
        return "invalid_timeseries", "'metadata' must be an object", "ValueError"
    values = doc.get("values")
    if not isinstance(values, list) or not values:
        return "invalid_timeseries", "'values' must be a non-empty array", "ValueError"
    is_window = isinstance(values[0], list)
    allowed = WINDOW_KEYS if is_window else OBSERVATION_KEYS
    if not allowed.issuperset(doc):
        unknown = set(doc) - allowed
        kind = "window" if is_window else "observation"
        return "invalid_timeseries", f"unknown fields {sorted(unknown)} for a {kind}", "ValueError"
    return doc


def _shape_problem(rows: list[Any], is_window: bool, window_length: int, channels: int) -> _Why | None:
    # One pass over the element types in C rather than a Python check per value: this is the hot loop.
    if is_window:
        numbers = set(map(type, rows)) == _LIST and _NUMERIC_TYPES.issuperset(
            map(type, itertools.chain.from_iterable(rows))
        )
    else:
        numbers = _NUMERIC_TYPES.issuperset(map(type, rows[0]))
    if not numbers:
        return "invalid_timeseries", "'values' must hold numbers (a window: arrays of numbers)", "ValueError"
    if is_window and len(rows) != window_length:
        return "wrong_shape", f"window of {len(rows)} points, the model takes {window_length}", "ValueError"
    widths = {len(row) for row in rows}
    if widths != {channels}:
        return "wrong_shape", f"{sorted(widths)} channels, the model takes {channels}", "ValueError"
    return None


def _point_values(values: list[Any]) -> np.ndarray | _Why:
    # A handful of numbers: checked in Python, where each numpy call would cost more than the
    # check. NaN fails both comparisons; a huge integer compares exactly and fails too.
    n = sum(1 for v in values if v is None or not -_FLOAT32_MAX <= v <= _FLOAT32_MAX)
    if n:
        return "non_finite", f"{n} value(s) are null, NaN, infinite or beyond float32", "ValueError"
    return np.array(values, dtype=np.float32)


def _observation(msg: SourceMessage, doc: dict[str, Any], values: np.ndarray) -> Observation | BadRecord:
    ts = _timestamp(doc, "timestamp_ms", -1) if "timestamp_ms" in doc else None
    if ts is None:
        return BadRecord(msg, "invalid_timeseries", "'timestamp_ms' is required: an integer from 0 to 2**63-1")
    return Observation(msg, doc["series_id"], ts, values)


def _window(
    msg: SourceMessage, doc: dict[str, Any], values: np.ndarray, tp: TopicPartition
) -> TimeSeriesWindow | BadRecord:
    end = _timestamp(doc, "end_ms", msg.timestamp_ms)
    start = _timestamp(doc, "start_ms", end if end is not None else 0)
    if start is None or end is None or start > end:
        why = "'start_ms'/'end_ms' must be integers from 0 to 2**63-1, start <= end"
        return BadRecord(msg, "invalid_timeseries", why)
    return TimeSeriesWindow(msg, doc["series_id"], start, end, values, ((tp, msg.offset),))


class TimeSeriesModality:
    name = "timeseries"
    fields = FIELDS

    def __init__(self, spec: EncoderSpec, settings: Settings) -> None:
        dims = spec.inputs[0].dims
        if len(dims) != 2 or spec.inputs[0].dtype != "FP32":
            raise ConfigError(f"encoder {spec.name} does not take (window x channels) FP32 windows: {spec.inputs[0]}")
        self.window_length, self.channels = dims
        ts = settings.timeseries
        self._max_bytes = ts.max_message_bytes
        self._max_id_bytes = ts.max_id_bytes
        self._max_header_bytes = ts.max_header_bytes
        self.windows = SlidingWindows(
            self.window_length,
            ts.stride or self.window_length,
            ts.max_series,
            ts.idle_evict_ms,
            ts.max_state_bytes,
        )

    def decode(self, msg: SourceMessage) -> TimeSeriesWindow | BadRecord | Deferred:
        return self.decode_many([msg])[0]

    def decode_many(self, msgs: Sequence[SourceMessage]) -> list[TimeSeriesWindow | BadRecord | Deferred]:
        """In order: each point may complete its series' window. Window messages keep no state, so
        their values are converted together once the poll is read (``_windows``)."""
        out: list[Any] = []
        pending: list[int] = []  # where out holds a checked window message
        for msg in msgs:
            checked = _checked(
                msg, self.window_length, self.channels, self._max_bytes, self._max_id_bytes, self._max_header_bytes
            )
            if isinstance(checked, _WindowDoc):
                pending.append(len(out))
                out.append(checked)
            elif isinstance(checked, Observation):
                out.append(self._add(checked))
            else:
                out.append(checked)
        if pending:
            made = _windows([out[i] for i in pending], self.window_length, self.channels)
            for i, window in zip(pending, made, strict=True):
                out[i] = window
        return out

    def _add(self, obs: Observation) -> TimeSeriesWindow | BadRecord | Deferred:
        item, dead = self.windows.add(obs)
        if item is None and not dead:
            return _ABSORBED  # most points: one shared instance instead of one per message
        return Deferred(item, tuple(dead))

    def prepare(self, items: Sequence[TimeSeriesWindow]) -> Sequence[TimeSeriesWindow]:
        return items  # a window is ready once decode closed it

    def stack(self, items: Sequence[TimeSeriesWindow]) -> tuple[np.ndarray, ...]:
        return (np.stack([it.values for it in items]).astype(np.float32, copy=False),)

    def row(self, item: TimeSeriesWindow) -> RowMeta:
        src = item.source
        return RowMeta(
            key=src.key,
            id=f"{item.series_id}@{item.end_ms}",
            topic=src.topic,
            partition=src.partition,
            offset=src.offset,
            timestamp_ms=item.end_ms,
            extra={
                "series_id": item.series_id,
                "window_start": item.start_ms,
                "window_end": item.end_ms,
                "points": item.points,
                "messages_finished": len(item.covers),
            },
        )

    def covers(self, item: TimeSeriesWindow) -> list[tuple[TopicPartition, int]]:
        return list(item.covers)

    def event_time_ms(self, item: TimeSeriesWindow) -> int:
        # The broker time of the message that completed the window: window timestamps may be on any clock.
        return item.source.timestamp_ms

    def forget(self, partitions: Sequence[TopicPartition]) -> None:
        self.windows.forget(partitions)


DEFAULTS = ModalityDefaults(
    topics=ModalityTopics.named("timeseries"),
    families=("autoencoder", "lstm"),
    sections=("timeseries",),
    encoder={"family": "autoencoder", "arch": "autoencoder"},
    # A window costs the autoencoder microseconds, so a batch of 16 or 32 is mostly per-request cost
    # (the RPC, Arrow, a produce): 256 drained a backlog about 3x faster than 16 (1,900 -> 5,700 windows/s).
    batch_size=256,
    pretrained=False,
    window=32,
    unit="windows",
    # The autoencoder's score and flag (export: its outputs with a column); an LSTM's rows leave them null.
    model_columns=(pa.field("reconstruction_error", pa.float32()), pa.field("anomaly", pa.bool_())),
    # The model costs microseconds a window: the pipeline's own plumbing decides, and should do 2x a script.
    bench_peer_target=2.0,
)

register_modality("timeseries", TimeSeriesModality, FIELDS, defaults=DEFAULTS)
