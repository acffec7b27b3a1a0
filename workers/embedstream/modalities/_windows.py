"""Per-series sliding windows over observation points; the rules are in ``modalities/timeseries.py``."""

from __future__ import annotations

import sys
from collections import Counter, OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from kafka.structs import TopicPartition

from embedstream.errors import ConfigError
from embedstream.records import BadRecord, SourceMessage


# Slotted, not frozen: one is made per point or window (see records.SourceMessage); never mutated.
@dataclass(slots=True)
class Observation:
    """One point of one series: ``values`` holds one float32 per channel."""

    source: SourceMessage
    series_id: str
    timestamp_ms: int
    values: np.ndarray = field(repr=False)


@dataclass(slots=True)
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


_Key = tuple[str, int, str]  # topic, partition, series_id

# Fixed costs of holding one point beyond its variable-sized parts (CPython 3.11, 64-bit): the
# Observation and SourceMessage objects with their __dict__s, the headers tuple, the int fields, the
# numpy array header and the deque slot. Measured with tracemalloc (tests/unit/test_timeseries.py).
POINT_OVERHEAD_BYTES = 450
# Per open series: the OrderedDict entry, its key tuple, the _Series object and its empty deque.
SERIES_OVERHEAD_BYTES = 1000


def point_bytes(obs: Observation) -> int:
    """What holding this point costs: its raw message (value, key, headers, and the message as consumed
    where a format layer rewrote it), series id and values."""
    src = obs.source
    size = POINT_OVERHEAD_BYTES + sys.getsizeof(src.value) + sys.getsizeof(obs.series_id) + obs.values.nbytes
    if src.key is not None:
        size += sys.getsizeof(src.key)
    for name, value in src.headers:
        size += sys.getsizeof(name) + sys.getsizeof(value) + 64  # + the pair tuple
    if src.origin is not None:  # a registry record rewritten by a format layer: its consumed bytes are held too
        size += sys.getsizeof(src.origin) + sys.getsizeof(src.origin.value)
    return size


def series_bytes(key: _Key) -> int:
    return SERIES_OVERHEAD_BYTES + sys.getsizeof(key[0]) + sys.getsizeof(key[2])


@dataclass
class _Series:
    points: deque[Observation] = field(default_factory=deque)
    last_ts: int = -1
    in_published: int = 0  # leading buffered points that were already part of an emitted window
    bytes: int = 0  # series_bytes + point_bytes of the buffered points


class SlidingWindows:
    """Per-series count windows with LRU-bounded state; returns windows and the dead letters it decides.

    State is bounded twice: by count (``max_series``) and by bytes (``max_state_bytes``, the
    ``point_bytes`` of every buffered point plus ``series_bytes`` per series, kept in ``state_bytes``).
    Over either, the least recently updated series are evicted, and at last the current one.
    """

    def __init__(
        self,
        length: int,
        stride: int,
        max_series: int,
        idle_evict_ms: int | None = None,
        max_state_bytes: int | None = None,
    ) -> None:
        if not 1 <= stride <= length:
            raise ConfigError(f"timeseries.stride must be from 1 to the window length {length}, got {stride}")
        self.length = length
        self.stride = stride
        self.max_series = max_series
        self.idle_evict_ms = idle_evict_ms
        self.max_state_bytes = max_state_bytes
        self.state_bytes = 0
        self.peak_state_bytes = 0
        self._series: OrderedDict[_Key, _Series] = OrderedDict()
        self._newest: dict[tuple[str, int], int] = {}  # newest event time per partition, for idle eviction
        self.counters: Counter[str] = Counter()

    def __len__(self) -> int:
        return len(self._series)

    def open_points(self) -> int:
        return sum(len(s.points) for s in self._series.values())

    def add(self, obs: Observation) -> tuple[TimeSeriesWindow | BadRecord | None, list[BadRecord]]:
        """Take one point: (a completed window, a ``late`` dead letter or None; dead letters of evictions)."""
        src = obs.source
        key = (src.topic, src.partition, obs.series_id)
        st = self._series.get(key)
        if st is not None and obs.timestamp_ms <= st.last_ts:
            self.counters["late"] += 1
            why = (
                f"timestamp_ms {obs.timestamp_ms} is not after the last accepted point of series "
                f"{obs.series_id!r} ({st.last_ts}); points must arrive in time order per series"
            )
            return BadRecord(src, "late", why), []
        part = (src.topic, src.partition)
        self._newest[part] = max(self._newest.get(part, obs.timestamp_ms), obs.timestamp_ms)
        dead: list[BadRecord] = []
        if st is None:
            st = self._series[key] = _Series(bytes=series_bytes(key))
            self.state_bytes += st.bytes
            self.counters["series_opened"] += 1
            while len(self._series) > self.max_series:
                dead += self._evict(*self._series.popitem(last=False), f"over max_series={self.max_series}")
        else:
            self._series.move_to_end(key)
        dead += self._evict_idle(key)
        st.points.append(obs)
        st.last_ts = obs.timestamp_ms
        size = point_bytes(obs)
        st.bytes += size
        self.state_bytes += size
        self.peak_state_bytes = max(self.peak_state_bytes, self.state_bytes)
        window = None
        if len(st.points) < self.length:
            self.counters["absorbed"] += 1
        else:
            window = self._emit(st, obs)
        if self.max_state_bytes is not None and self.state_bytes > self.max_state_bytes:
            dead += self._evict_over_bytes()
        return window, dead

    def _evict_over_bytes(self) -> list[BadRecord]:
        """Least recently updated first (the current series, most recent, goes last) until the state fits."""
        limit = self.max_state_bytes
        dead: list[BadRecord] = []
        while self._series and limit is not None and self.state_bytes > limit:
            dead += self._evict(*self._series.popitem(last=False), f"held state over max_state_bytes={limit}")
        return dead

    def _emit(self, st: _Series, newest: Observation) -> TimeSeriesWindow:
        """The full buffer as a window row; its oldest ``stride`` points are finished by it and leave."""
        pts = st.points
        window = TimeSeriesWindow(
            source=newest.source,
            series_id=newest.series_id,
            start_ms=pts[0].timestamp_ms,
            end_ms=pts[-1].timestamp_ms,
            values=np.stack([p.values for p in pts]),
            covers=tuple(
                (TopicPartition(p.source.topic, p.source.partition), p.source.offset)
                for p in (pts[i] for i in range(self.stride))
            ),
        )
        freed = sum(point_bytes(pts.popleft()) for _ in range(self.stride))
        st.bytes -= freed
        self.state_bytes -= freed
        st.in_published = len(pts)
        self.counters["windows"] += 1
        return window

    def _evict_idle(self, current: _Key) -> list[BadRecord]:
        # Only the least recently updated series are looked at: O(1) per point, not a scan.
        dead: list[BadRecord] = []
        if self.idle_evict_ms is None:
            return dead
        while self._series:
            key, st = next(iter(self._series.items()))
            if key == current or st.last_ts >= self._newest[key[:2]] - self.idle_evict_ms:
                break
            del self._series[key]
            dead += self._evict(key, st, f"idle for more than {self.idle_evict_ms} ms of event time")
        return dead

    def _evict(self, key: _Key, st: _Series, why: str) -> list[BadRecord]:
        """Account for a series already taken out of ``_series``; its buffered points as dead letters."""
        self.state_bytes -= st.bytes
        self.counters["series_evicted"] += 1
        self.counters["points_evicted"] += len(st.points)
        n = len(st.points)
        msg = (
            f"series {key[2]!r} evicted ({why}) with {n} unfinished point(s), {st.in_published} of them "
            "already part of a published window"
        )
        return [BadRecord(p.source, "evicted", msg, "Eviction") for p in st.points]

    def forget(self, partitions: Sequence[TopicPartition]) -> int:
        """Drop the state of lost partitions; returns the points dropped (their new owner re-reads them)."""
        lost = {(tp.topic, tp.partition) for tp in partitions}
        gone = [self._series.pop(k) for k in [k for k in self._series if k[:2] in lost]]
        self.state_bytes -= sum(st.bytes for st in gone)
        dropped = sum(len(st.points) for st in gone)
        for part in lost:
            self._newest.pop(part, None)
        return dropped
